#!/usr/bin/env python
"""On a GPU: a decoder block's GEMVs as Pallas (Triton) kernels with prologues (`gemv` below) against the
XLA form of the default decode path (fused projections, folded norms, shadow row), for equality and time.
RANDOM bf16 weights of LLaMA-2-7B's shapes, batch 1.

An experiment, not part of the library. On H200 the kernels alone stream the weights at 2.9-4.1 TB/s, their
best settings taking 3-11% longer than XLA's GEMM kernels (CUPTI, `profile_gemv.py --trace`), but a block of
prologue kernels is still slower than XLA's: 114.7 against 106.9 us of device time per block
(docs/performance.md, 2026-11-29). The gate/up GEMV's norm prologue costs ~10 us because every program
re-reads all of o's split-K partials. The 2026-11-29 measurement's ~1.1 TB/s was wrong: its chains sliced one stacked weight
array, and XLA copies each slice into a buffer of its own before a custom call (its HLO), which made the same
Pallas chain 1.9-2.5x slower and left XLA's GEMMs as they were (see `rand_layers`).

A "block" here is the default path's block without attention (q stands in for the attention output):
  XLA:    1/rms(x); qkv GEMM * 1/rms; o GEMM; h = x + o; 1/rms(h); gate/up GEMM * 1/rms; silu(g) * u;
          down GEMM; h + down                                        (about 10 kernels)
  kernel: gemv(norm: x) -> qkv; q -> gemv(x) -> o; gemv(norm: x + o) -> gate/up and h;
          gemv(swiglu) -> down; h + down                             (6 kernels)
Each is timed in a chain of 32 blocks with distinct weights (so nothing stays in L2; each weight an array of
its own, as the model holds them), in this process.

  python experiments/check_gemv_kernel.py            # equality, then XLA vs the kernel's default settings
  python experiments/check_gemv_kernel.py --sweep    # the kernel's settings (run 4's; --sweep-all: runs 1-4's;
                                                 # --tuned: per-shape settings, 2026-11-29)
  python experiments/check_gemv_kernel.py --mosaic   # JAX's Mosaic GPU Hopper matmul as a GEMV, against XLA
  python experiments/check_gemv_kernel.py --mosaic-waves   # the same with narrower CTA tiles (fuller waves)
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from spd_jax.measure import host_times  # noqa: E402
from spd_jax.kernels import _out_shape  # noqa: E402
from spd_jax.model import matmul  # noqa: E402

# ----------------------------------------------------------------------------- the kernel under test
#
# One row times a weight [K, N], split over programs (column blocks x K splits); each program sums its K
# split and writes float32 partials [S, 1, N] that the consumer sums (as XLA's split-K GEMMs do). The
# prologue computes the row from its producers' partials while loading it, which removes the small XLA
# kernels between the GEMMs of a decoder block: "x" reads a bf16 row; "norm" adds a residual row and the
# partials of the previous projection (writing the new residual), computes RMSNorm's 1/rms over the whole row
# and scales the output by it (folded norms: the weight carries the norm's scale); "swiglu" computes
# silu(gate) * up from the gate/up projection's partials.

GEMV_PROLOGUES = ("x", "norm", "swiglu")
GEMV_BLOCK_N, GEMV_BLOCK_K, GEMV_WARPS, GEMV_STAGES, GEMV_PROGRAMS = 128, 128, 4, 3, 512
GEMV_MODE = "dot"


def _pow2_block(n: int, pref: int, what: str) -> int:
    for b in (pref, 256, 128, 64, 32, 16):
        if b <= pref and n % b == 0:
            return b
    raise ValueError(f"the GEMV kernel needs {what} of a multiple of 16, got {n}")


def _gemv_kernel(*refs, prologue: str, n_parts: int, k: int, block_k: int, nkb: int, s_out: int, eps: float,
                 half: int, write_res: bool, mode: str, masked: bool):
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    f32 = jnp.float32
    col, s = pl.program_id(0), pl.program_id(1)
    refs = list(refs)

    def summed(ref, off, size=block_k, mask=None):  # sum over the producer's split-K partials [S', 1, K]
        rd = lambda j: (ref[j, 0, pl.ds(off, size)] if mask is None else  # noqa: E731
                        plgpu.load(ref.at[j, 0, pl.ds(off, size)], mask=mask, other=0.0)).astype(f32)
        return sum((rd(j) for j in range(1, n_parts)), rd(0))

    if prologue == "x":
        x_ref, w_ref, o_ref = refs

        def load(off):
            return x_ref[0, pl.ds(off, block_k)].astype(f32)
    elif prologue == "norm":
        res_ref = refs.pop(0)
        parts_ref = refs.pop(0) if n_parts else None
        w_ref, o_ref, *res_out = refs

        def load(off, size=block_k, mask=None):  # the residual stream's new value, rounded to its dtype
            ref = res_ref.at[0, pl.ds(off, size)]  # as the reference path rounds it
            x = (ref[...] if mask is None else plgpu.load(ref, mask=mask, other=0.0)).astype(f32)
            if n_parts:
                x = x + summed(parts_ref, off, size, mask)
            return x.astype(res_ref.dtype).astype(f32)
    else:  # swiglu: gate = columns [0, half) of the producer, up = [half, 2 half)
        parts_ref, w_ref, o_ref = refs

        def load(off):
            g, u = summed(parts_ref, off), summed(parts_ref, half + off)
            g, u = g.astype(w_ref.dtype).astype(f32), u.astype(w_ref.dtype).astype(f32)
            return g / (1.0 + jnp.exp(-g)) * u

    wdt = w_ref.dtype
    if prologue == "norm" and masked:  # 1/rms over the whole row, loaded at once (padded to a power of two)
        kp = pl.next_power_of_2(k)        # by every program: the row is small and stays in L2
        mask = jnp.arange(kp) < k
        x = load(0, kp, mask)
        if write_res:
            @pl.when((col == 0) & (s == 0))
            def _():
                plgpu.store(res_out[0].at[0, pl.ds(0, kp)], x.astype(res_out[0].dtype), mask=mask)
        scale = lax.rsqrt((x * x).sum() / k + eps)
    elif prologue == "norm":  # Pallas' interpreter: the same in blocks (no masked loads there)
        first = (col == 0) & (s == 0)

        def ss_body(i, acc):
            x = load(i * block_k)
            if write_res:
                @pl.when(first)
                def _():
                    res_out[0][0, pl.ds(i * block_k, block_k)] = x.astype(res_out[0].dtype)
            return acc + (x * x).sum()

        ss = lax.fori_loop(0, nkb, ss_body, jnp.zeros((), f32))
        scale = lax.rsqrt(ss / k + eps)
    lo, hi = s * nkb // s_out, (s + 1) * nkb // s_out

    bn = w_ref.shape[1]
    if mode == "dot":  # the row as row 0 of 16 (Triton's smallest dot); the other rows are zero
        def body(i, acc):
            x = load(i * block_k).astype(wdt)
            x16 = jnp.where(jnp.arange(16)[:, None] == 0, x[None, :], jnp.zeros((16, block_k), wdt))
            return acc + plgpu.dot(x16, w_ref[pl.ds(i * block_k, block_k), :])

        acc = lax.fori_loop(lo, hi, body, jnp.zeros((16, bn), f32)).sum(axis=0)
    elif mode == "acc":  # elementwise products accumulated, one reduction at the end
        def body(i, acc):
            x = load(i * block_k).astype(wdt).astype(f32)
            return acc + x[:, None] * w_ref[pl.ds(i * block_k, block_k), :].astype(f32)

        acc = lax.fori_loop(lo, hi, body, jnp.zeros((block_k, bn), f32)).sum(axis=0)
    else:  # "reduce": a reduction per iteration
        def body(i, acc):
            x = load(i * block_k).astype(wdt).astype(f32)
            w = w_ref[pl.ds(i * block_k, block_k), :].astype(f32)
            return acc + (x[:, None] * w).sum(axis=0)

        acc = lax.fori_loop(lo, hi, body, jnp.zeros((bn,), f32))
    o_ref[...] = acc * scale if prologue == "norm" else acc


def gemv(prologue: str, w_kn, *, x=None, res=None, parts=None, eps: float = 1e-6, half: int = 0,
         splits: int | None = None, block_n: int | None = None, block_k: int | None = None,
         num_warps: int | None = None, num_stages: int | None = None, mode: str | None = None,
         interpret: bool | None = None):
    """One row times w [K, N] -> float32 partials [S, 1, N] (their sum over S is the product), and for the
    "norm" prologue with `parts` also the new residual row [1, K].

    prologue "x": the row is x [1, K]. "norm": the row is res [1, K] + sum(parts [S', 1, K]) (rounded to
    res' dtype, the residual stream), the output scaled by its RMSNorm 1/rms (eps): w must carry the norm's
    scale (folded norms). "swiglu": the row is silu(g) * u, g and u the columns [0, half) and [half, 2 half)
    of sum(parts [S', 1, 2 half]), each rounded to w's dtype as the reference path rounds them."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    if prologue not in GEMV_PROLOGUES:
        raise ValueError(f"prologue must be one of {GEMV_PROLOGUES}, got {prologue!r}")
    k, n = w_kn.shape
    bn = _pow2_block(n, block_n or GEMV_BLOCK_N, "output columns")
    bk = _pow2_block(k, block_k or GEMV_BLOCK_K, "input columns")
    nkb = k // bk
    n_cols = n // bn
    s_out = splits or max(1, min(nkb, round(GEMV_PROGRAMS / n_cols)))
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    full = lambda a: pl.BlockSpec(a.shape, lambda i, s: (0,) * a.ndim)  # noqa: E731
    if prologue == "x":
        args, like = [x], x
    elif prologue == "norm":
        args, like = [res] + ([parts] if parts is not None else []), res
    else:
        args, like = [parts], parts
    n_parts = 0 if prologue == "x" or parts is None else parts.shape[0]
    write_res = prologue == "norm" and parts is not None
    out_shapes = [_out_shape(like, (s_out, 1, n), jnp.float32)]
    out_specs = [pl.BlockSpec((None, None, bn), lambda i, s: (s, 0, i))]
    if write_res:
        out_shapes.append(_out_shape(like, res.shape, res.dtype))
        out_specs.append(full(res))
    kernel = functools.partial(_gemv_kernel, prologue=prologue, n_parts=n_parts, k=k, block_k=bk, nkb=nkb,
                               s_out=s_out, eps=float(eps), half=half, write_res=write_res,
                               mode=mode or GEMV_MODE, masked=not interpret)
    outs = pl.pallas_call(
        kernel, grid=(n_cols, s_out),
        in_specs=[full(a) for a in args] + [pl.BlockSpec((k, bn), lambda i, s: (0, i))],
        out_specs=out_specs, out_shape=out_shapes,
        compiler_params=plgpu.CompilerParams(num_warps=num_warps or GEMV_WARPS,
                                             num_stages=num_stages or GEMV_STAGES),
        interpret=interpret, name=f"spd_gemv_{prologue}",
    )(*args, w_kn)
    return tuple(outs) if write_res else outs[0]


LAYERS, D, F, EPS = 32, 4096, 11008, 1e-5
BF = jnp.bfloat16


def rand_layers(key, shape, layers=LAYERS):
    """`layers` random bf16 weights, each its own array, as the model holds them (a list of blocks). Slices
    of one stacked array would not do: XLA fuses a slice into its own GEMM, but copies it into a buffer of
    its own before a Pallas kernel (a custom call), which made the Pallas chain 1.9-2.5x slower (2026-11-29,
    `profile_gemv.py --jax` and `--slice-hlo`)."""
    return [(jax.random.normal(k, shape, jnp.float32) * 0.02).astype(BF) for k in jax.random.split(key, layers)]


def weights(key, layers=LAYERS, d=D, f=F):
    """A list of `layers` blocks' weights (dicts of separate arrays)."""
    ks = jax.random.split(key, 4)
    cols = {"qkv": rand_layers(ks[0], (d, 3 * d), layers), "o": rand_layers(ks[1], (d, d), layers),
            "gu": rand_layers(ks[2], (d, 2 * f), layers), "down": rand_layers(ks[3], (f, d), layers)}
    return [{name: col[i] for name, col in cols.items()} for i in range(layers)]


def inv_rms(x):
    xf = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + EPS)


def xla_block(x, w):
    """x [1, 2, D] (the shadow row) -> [1, 2, D], as model.Block with fused + folded layouts."""
    qkv = (matmul(x, w["qkv"]) * inv_rms(x)).astype(BF)
    y = matmul(qkv[..., :D], w["o"])
    h = x + y
    gu = (matmul(h, w["gu"]) * inv_rms(h)).astype(BF)
    f = gu.shape[-1] // 2
    z = matmul(jax.nn.silu(gu[..., :f]) * gu[..., f:], w["down"])
    return h + z


def kernel_block(x, w, tune, tune_o=None, tune_down=None, tune_gu=None):
    """x [1, D] -> [1, D] with the four GEMVs as kernels (`tune`: the settings of q/k/v, and of the others
    where theirs are None)."""
    qkv = gemv("norm", w["qkv"], res=x, eps=EPS, **tune)
    q = qkv.sum(0)[:, :D].astype(BF)  # stands in for the attention (one XLA fusion in both forms)
    o = gemv("x", w["o"], x=q, **(tune_o or tune))
    gu, h = gemv("norm", w["gu"], res=x, parts=o, eps=EPS, **(tune_gu or tune))
    z = gemv("swiglu", w["down"], parts=gu, half=w["gu"].shape[-1] // 2, **(tune_down or tune))
    return (h.astype(jnp.float32) + z.sum(0)).astype(BF)


def chain(block, ws, *tune):
    def run(x, ws):
        for i in range(LAYERS):
            x = block(x, ws[i], *tune)
        return x
    return jax.jit(run)


def med_us(f, *args, repeats=30):
    return float(np.median(host_times(f, *args, repeats=repeats))) * 1e6


def next_row(y, k):
    """A product's output [1, n] as the next product's bf16 row [1, k] (tiled or cut): the chains' glue."""
    return jnp.tile(y, (1, -(-k // y.shape[-1])))[:, :k].astype(BF)


def block_inputs():
    """The 32 blocks' weights, a random row x1 [1, D] and its shadow-row form x2 [1, 2, D]."""
    ws = weights(jax.random.PRNGKey(0))
    x1 = (jax.random.normal(jax.random.PRNGKey(1), (1, D), jnp.float32)).astype(BF)
    return ws, x1, jnp.repeat(x1[:, None], 2, axis=1)


MOSAIC_CONFIGS = [  # (label, rows of the padded row block, TuningConfig fields)
    ("n64 k64 s4", 64, dict(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=4, epi_tile_m=64)),
    ("n64 k128 s4", 64, dict(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=4, epi_tile_m=64)),
    ("n64 k64 s8", 64, dict(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=8, epi_tile_m=64)),
    ("n128 k64 s4", 64, dict(tile_m=64, tile_n=128, tile_k=64, max_concurrent_steps=4, epi_tile_m=64)),
]
# The persistent kernel gives each of the GPU's SMs whole output tiles (two warpgroups' columns per CTA with
# wg_dimension N): 22 016 columns in 128-column tiles are 172 tiles, 1.3 waves on 132 SMs. Narrower CTA tiles
# fill the waves better.
MOSAIC_WAVE_CONFIGS = [  # (64-column warpgroup tiles are the narrowest this kernel takes: its swizzle tile)
    ("cta 128 cols (wg N) s4", 64, dict(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=4, epi_tile_m=64)),
    ("cta 64 cols (wg M) s4", 128, dict(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=4, epi_tile_m=64,
                                        wg_dimension="M")),
    ("cta 64 cols (wg M) s8", 128, dict(tile_m=64, tile_n=64, tile_k=64, max_concurrent_steps=8, epi_tile_m=64,
                                        wg_dimension="M")),
    ("cta 64 cols (wg M) k128 s4", 128, dict(tile_m=64, tile_n=64, tile_k=128, max_concurrent_steps=4,
                                             epi_tile_m=64, wg_dimension="M")),
]


def mosaic_probe(shapes=((D, 2 * F), (D, 3 * D), (D, D)), configs=MOSAIC_CONFIGS):
    """JAX's own Hopper matmul (Pallas Mosaic GPU: TMA loads, wgmma) as a GEMV, the row padded to 64 (or 128)
    rows: does a TMA pipeline stream a projection's weight faster than XLA's GEMM? (No split-K: whole output
    tiles per CTA, so only shapes of >= ~132 tiles fill the GPU.)"""
    import dataclasses

    from jax.experimental.pallas.ops.gpu import hopper_matmul_mgpu as hm

    fields = {f.name for f in dataclasses.fields(hm.TuningConfig)}
    for k, n in shapes:
        wk = rand_layers(jax.random.PRNGKey(k + n), (k, n))
        x = (jax.random.normal(jax.random.PRNGKey(2), (1, k), jnp.float32)).astype(BF)

        def run_x(x, ws):
            for i in range(LAYERS):
                x = matmul(x, ws[i])[:, :k]
            return x

        tx = med_us(jax.jit(run_x), x, wk) / LAYERS
        print(f"mosaic probe {k}x{n}: xla {tx:6.2f} us ({k * n * 2 / tx / 1e3:5.0f} GB/s)", flush=True)
        for label, rows, kw in configs:
            if set(kw) - fields:
                print(f"  mgpu {label}: skipped, this JAX's TuningConfig has no {sorted(set(kw) - fields)}")
                continue
            if "wg_dimension" in kw:
                kw = {**kw, "wg_dimension": hm.MatmulDimension[kw["wg_dimension"]]}
            try:
                cfg = hm.TuningConfig(**kw)

                def run_m(x, ws, cfg=cfg, rows=rows):
                    xp = jnp.concatenate([x, jnp.zeros((rows - 1, k), x.dtype)], axis=0)
                    for i in range(LAYERS):
                        xp = hm.matmul(xp, ws[i], None, cfg)[:, :k]
                    return xp[:1]

                tm = med_us(jax.jit(run_m), x, wk) / LAYERS
                print(f"  mgpu {label}: {tm:6.2f} us ({k * n * 2 / tm / 1e3:5.0f} GB/s, {tx / tm:.2f}x xla)",
                      flush=True)
            except Exception as e:  # noqa: BLE001  (an API or a tiling this JAX refuses)
                print(f"  mgpu {label}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        del wk


O4 = {"splits": 4, "block_n": 32}
# (label, settings of every GEMV, of the o GEMV, of the down GEMV); the --sweep of run 4
SWEEP = [("reduce", {"mode": "reduce"}, None, None), ("dot o,down splits4 bn32", {}, O4, O4),
         ("dot bk256 stages2", {"block_k": 256, "num_stages": 2}, None, None),
         ("dot bn64", {"block_n": 64}, None, None)]
# the other settings of runs 1 and 3 (run 1 ran them in the "reduce" form, the only one then; here "dot")
SWEEP_MORE = [
    ("acc bk32", {"mode": "acc", "block_k": 32}, None, None), ("acc bk64", {"mode": "acc", "block_k": 64}, None, None),
    ("stages2", {"num_stages": 2}, None, None), ("stages4", {"num_stages": 4}, None, None),
    ("warps8", {"num_warps": 8}, None, None), ("warps8 bn256", {"num_warps": 8, "block_n": 256}, None, None),
    ("bn256", {"block_n": 256}, None, None), ("bk64", {"block_k": 64}, None, None),
    ("bk64 stages4", {"block_k": 64, "num_stages": 4}, None, None), ("bk256", {"block_k": 256}, None, None),
    ("bn64 bk256", {"block_n": 64, "block_k": 256}, None, None),
    ("splits1", {"splits": 1}, None, None), ("splits2", {"splits": 2}, None, None),
    ("splits4", {"splits": 4}, None, None), ("splits8", {"splits": 8}, None, None),
    ("o,down splits4 bn32 stages4", {"num_stages": 4}, {**O4, "num_stages": 4}, {**O4, "num_stages": 4}),
    ("o,down splits8 bn64", {}, {"splits": 8, "block_n": 64}, {"splits": 8, "block_n": 64}),
]


S2, BN64, RED = {"splits": 2}, {"block_n": 64}, {"mode": "reduce"}
# each GEMV with its fastest setting of run 2 (2026-11-29, the weights separate arrays): (label, q/k/v, o,
# down, gate/up)
TUNED = [("per shape: qkv bn64, o reduce, gu+down s2", BN64, RED, S2, S2),
         ("bn64 everywhere, gu+down s2", BN64, BN64, {**BN64, **S2}, {**BN64, **S2}),
         ("reduce bn64 bk256 s4 everywhere", {"mode": "reduce", "block_n": 64, "block_k": 256, "splits": 4},
          None, None, None)]


def main():
    if "--mosaic" in sys.argv:
        return mosaic_probe()
    if "--mosaic-waves" in sys.argv:
        return mosaic_probe(shapes=((D, 2 * F),) if "--wide-only" in sys.argv else ((D, 2 * F), (D, 3 * D)),
                            configs=MOSAIC_WAVE_CONFIGS)
    sweep = "--sweep" in sys.argv
    ws, x1, x2 = block_inputs()
    dev = jax.devices()[0]
    print(f"# {dev.device_kind}, jax {jax.__version__}, LLaMA-2-7B shapes, random bf16 weights, {LAYERS} blocks")
    # equality: one block, both forms against a float32 evaluation of the same bf16 weights
    w0 = ws[0]
    ref = jax.jit(lambda x, w: xla_block(x.astype(jnp.float32), jax.tree.map(lambda a: a.astype(jnp.float32),
                                                                              w)))(x2, w0)[:, 0]
    ox = jax.jit(xla_block)(x2, w0)[:, 0].astype(jnp.float32)
    ok = jax.jit(lambda x, w: kernel_block(x, w, {}))(x1, w0).astype(jnp.float32)
    scale = float(jnp.abs(ref).max())
    print(f"equality, one block (max |out| {scale:.3f}): xla {float(jnp.abs(ox - ref).max()):.3e}, "
          f"kernel {float(jnp.abs(ok - ref).max()):.3e}, kernel vs xla {float(jnp.abs(ok - ox).max()):.3e}")
    wbytes = sum(int(np.prod(a.shape)) * 2 for a in ws[0].values())
    t_x = med_us(chain(xla_block, ws), x2, ws)
    print(f"{'xla':44s} {t_x / LAYERS:7.2f} us/block  {wbytes / (t_x / LAYERS) / 1e3:7.0f} GB/s")
    for k, n in ((D, 3 * D), (D, D), (D, 2 * F), (F, D)):  # one GEMV shape, chained
        wk = rand_layers(jax.random.PRNGKey(k + n), (k, n))
        nxt = functools.partial(next_row, k=k)

        def run_x(x, ws, nxt=nxt):
            for i in range(LAYERS):
                x = nxt(matmul(x, ws[i])[:, 0])[:, None].repeat(2, axis=1)
            return x

        def run_k(x, ws, nxt=nxt, tune=None):
            for i in range(LAYERS):
                x = nxt(gemv("x", ws[i], x=x, **(tune or {})).sum(0))
            return x
        xk = x1[:, :1].repeat(k, axis=1)
        tx = med_us(jax.jit(run_x), xk[:, None].repeat(2, axis=1), wk) / LAYERS
        line = f"gemv {k}x{n}: xla {tx:6.2f} us ({k * n * 2 / tx / 1e3:5.0f} GB/s)"
        for name, tune in (("", {}), ("bn64", {"block_n": 64}), ("bk256", {"block_k": 256}),
                           ("reduce", {"mode": "reduce"}), ("s2", {"num_stages": 2}), ("s4", {"num_stages": 4})):
            tk = med_us(jax.jit(functools.partial(run_k, tune=tune)), xk, wk) / LAYERS
            line += f" | kernel{name and ' ' + name} {tk:6.2f} ({k * n * 2 / tk / 1e3:5.0f})"
        print(line, flush=True)
        del wk
    configs = [("default", {}, None, None)]
    if sweep or "--sweep-all" in sys.argv:
        configs += SWEEP
    if "--sweep-all" in sys.argv:
        configs += SWEEP_MORE
    if "--tuned" in sys.argv:
        configs += TUNED
    for name, tune, t_o, t_d, *t_gu in configs:
        try:
            t = med_us(chain(kernel_block, ws, tune, t_o, t_d, *t_gu), x1, ws)
        except Exception as e:  # a setting Triton cannot compile
            print(f"kernel {name:37s} failed: {type(e).__name__}: {str(e)[:200]}")
            continue
        print(f"kernel {name:37s} {t / LAYERS:7.2f} us/block  {wbytes / (t / LAYERS) / 1e3:7.0f} GB/s  "
              f"({t / t_x:.3f}x xla)")
    t_x2 = med_us(chain(xla_block, ws), x2, ws)
    print(f"{'xla (again)':44s} {t_x2 / LAYERS:7.2f} us/block")


if __name__ == "__main__":
    main()
