#!/usr/bin/env python
"""On a GPU: how fast do one-row GEMVs stream their weights, as XLA's GEMM, as the Pallas (Triton) GEMV of
`check_gemv_kernel.py`, as Triton's own (through PyTorch) and as cuBLAS, and where does a decoder block's time
go besides them? An experiment, not library code (docs/performance.md, 2026-11-29). RANDOM bf16 weights of
LLaMA-2-7B's projection shapes, one row (batch 1).

2026-11-29 measured the Pallas GEMV at ~1.1 TB/s. `--jax` and `--slice-hlo` show why that was wrong: its
chains sliced one stacked weight array, which XLA fuses into its own GEMM but copies into a buffer of its own
before each Pallas kernel (a custom call), making that chain 1.9-2.5x slower than on separate arrays.

Wall time of a jitted chain includes the host's dispatch and synchronisation (600-675 us per call on H200);
`--timeline` separates the kernels' device span from it.

  python experiments/profile_gemv.py --triton      # Triton itself (the one PyTorch ships), same GEMV forms,
                                               # both weight layouts, and cuBLAS through torch: the ceiling
                                               # a Triton GEMV reaches on this card, outside Pallas
                                               # (--kernel-times: also the kernels' own device time;
                                               # --quick: only the tilings that won in the full sweep)
  python experiments/profile_gemv.py --xla-layout  # XLA's GEMM with the weight stored [K, N] and [N, K]
  python experiments/profile_gemv.py --trace       # each kernel's device time (CUPTI): XLA's chain, Pallas'
  python experiments/profile_gemv.py --trace-blocks  # the same per block: XLA's block vs the prologue GEMVs'
  python experiments/profile_gemv.py --trace-o     # the o projection with one split (whole columns per program)
  python experiments/profile_gemv.py --timeline    # the kernels of two blocks in order: where the gaps sit
  python experiments/profile_gemv.py --slice-hlo   # the optimised HLO of GEMV chains on slices of a stacked array
  python experiments/profile_gemv.py --bare        # the Pallas GEMV alone, as --triton times Triton's
  python experiments/profile_gemv.py --jax         # XLA's GEMM and the Pallas GEMV, the weights separate
                                               # arrays or slices of one stacked array
"""

from __future__ import annotations

import functools
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = ((4096, 22016), (4096, 12288), (4096, 4096), (11008, 4096))  # gate/up, q/k/v, o, down
CHAIN = 8  # distinct weights per timed chain: 8 x 180 MB for gate/up, far over the 60 MB L2


def selected_shapes():
    """--shapes KxN,KxN (default: all four)."""
    if "--shapes" not in sys.argv:
        return SHAPES
    spec = sys.argv[sys.argv.index("--shapes") + 1]
    return tuple(tuple(int(v) for v in s.split("x")) for s in spec.split(","))


# ----------------------------------------------------------------------------- Triton, through PyTorch
def triton_kernels():
    import triton
    import triton.language as tl

    @triton.jit
    def gemv_kn(x_ptr, w_ptr, o_ptr, N: tl.constexpr, KS: tl.constexpr, BK: tl.constexpr, BN: tl.constexpr,
                DOT: tl.constexpr):
        """w [K, N] (N contiguous); program (column block, K split) -> o[split, cols] float32 partials."""
        pn, ps = tl.program_id(0), tl.program_id(1)
        cols = pn * BN + tl.arange(0, BN)
        if DOT:
            acc = tl.zeros((16, BN), tl.float32)
        else:
            acc = tl.zeros((BN,), tl.float32)
        for k0 in range(0, KS, BK):
            k = ps * KS + k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + k)
            w = tl.load(w_ptr + k[:, None] * N + cols[None, :])
            if DOT:
                x16 = tl.where(tl.arange(0, 16)[:, None] == 0, x[None, :], 0.0).to(w.dtype)
                acc += tl.dot(x16, w)
            else:
                acc += tl.sum(x.to(tl.float32)[:, None] * w.to(tl.float32), axis=0)
        if DOT:
            out = tl.sum(acc, axis=0)
        else:
            out = acc
        tl.store(o_ptr + ps * N + cols, out)

    @triton.jit
    def gemv_nk(x_ptr, w_ptr, o_ptr, N: tl.constexpr, K: tl.constexpr, KS: tl.constexpr, BK: tl.constexpr,
                BN: tl.constexpr):
        """w [N, K] (K contiguous, torch's Linear layout)."""
        pn, ps = tl.program_id(0), tl.program_id(1)
        rows = pn * BN + tl.arange(0, BN)
        acc = tl.zeros((BN,), tl.float32)
        for k0 in range(0, KS, BK):
            k = ps * KS + k0 + tl.arange(0, BK)
            x = tl.load(x_ptr + k).to(tl.float32)
            w = tl.load(w_ptr + rows[:, None] * K + k[None, :]).to(tl.float32)
            acc += tl.sum(w * x[None, :], axis=1)
        tl.store(o_ptr + ps * N + rows, acc)

    return gemv_kn, gemv_nk


QUICK = {"kn-reduce": ((64, 256), (64, 128)), "kn-dot": ((128, 64), (32, 256)), "nk-reduce": ((32, 256),)}


def torch_kernel_us(fn, reps=5):
    """Mean device time of the CUDA kernels one call of `fn` (CHAIN products) launches, per product (CUPTI)."""
    import torch

    fn()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kern = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.time_range.elapsed_us() for e in kern) / (reps * CHAIN)


def triton_probe():
    import torch
    import triton

    gemv_kn, gemv_nk = triton_kernels()
    dev = torch.device("cuda")
    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}; "
          f"chains of {CHAIN} distinct random bf16 weights, one row; us per product, GB/s of weight reads "
          "(do_bench_cudagraph, median)")
    configs = [(bn, bk, w, s) for bn, bk, w in ((32, 256, 4), (64, 128, 4), (64, 256, 4), (128, 64, 4))
               for s in (1, 2, 4, 8)]
    if "--quick" in sys.argv:  # only the tilings that won some shape in the full sweeps (runs 1 and 3)
        configs = [(bn, bk, 4, s) for bn, bk in ((64, 256), (64, 128), (128, 64), (32, 256)) for s in (1, 2, 4, 8)]
    for k, n in selected_shapes():
        x = torch.randn(1, k, device=dev, dtype=torch.bfloat16)
        w_kn = [torch.randn(k, n, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(CHAIN)]
        w_nk = [w.t().contiguous() for w in w_kn]
        nbytes = k * n * 2

        def bench(fn):
            ms = triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
            return ms * 1e3 / CHAIN

        def line(label, us):
            print(f"{k}x{n} {label:38s} {us:7.2f} us  {nbytes / us / 1e3:6.0f} GB/s", flush=True)

        ref = (x.float() @ w_kn[0].float())[0]
        cublas = lambda ws=w_kn: [x @ w for w in ws]  # noqa: E731
        line("cublas x @ w[K,N] (torch.matmul)", bench(cublas))
        line("cublas F.linear(x, w[N,K])", bench(lambda ws=w_nk: [torch.nn.functional.linear(x, w) for w in ws]))
        best = {}
        for form in ("kn-reduce", "kn-dot", "nk-reduce"):
            for bn, bk, warps, s in configs:
                if k % (s * bk) or n % bn or (form == "kn-dot" and bk > 256):
                    continue
                if "--quick" in sys.argv and (bn, bk) not in QUICK[form]:
                    continue
                o = torch.empty(s, n, device=dev, dtype=torch.float32)
                grid = (n // bn, s)
                if form == "nk-reduce":
                    run = functools.partial(gemv_nk[grid], N=n, K=k, KS=k // s, BK=bk, BN=bn, num_warps=warps)
                    args = [(x, w, o) for w in w_nk]
                else:
                    run = functools.partial(gemv_kn[grid], N=n, KS=k // s, BK=bk, BN=bn, DOT=form == "kn-dot",
                                            num_warps=warps)
                    args = [(x, w, o) for w in w_kn]
                try:
                    run(*args[0])
                    err = float((o.sum(0) - ref).abs().max())
                    us = bench(lambda run=run, args=args: [run(*a) for a in args])
                except Exception as e:  # noqa: BLE001  (a tiling Triton refuses: print and go on)
                    print(f"{k}x{n} {form} bn{bn} bk{bk} w{warps} s{s}: failed {type(e).__name__}: {str(e)[:120]}")
                    continue
                label = f"{form} bn{bn} bk{bk} w{warps} s{s}"
                if form not in best or us < best[form][1]:
                    best[form] = (label, us, err, run, args)
                if "--all" in sys.argv:
                    line(label + f" (err {err:.1e})", us)
        for label, us, err, _, _ in best.values():
            line("best " + label + f" (err {err:.1e})", us)
        if "--kernel-times" in sys.argv:  # the kernels alone (CUPTI), without the graph's launch gaps
            fns = {"cublas x @ w[K,N]": cublas}
            for label, _, _, run, args in best.values():
                fns[label] = lambda run=run, args=args: [run(*a) for a in args]
            for label, fn in fns.items():
                line("kernel time " + label, torch_kernel_us(fn))
        del w_kn, w_nk
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- JAX forms
def shape_inputs(k, n, layers):
    """`layers` random bf16 weights [k, n], each an array of its own, and one random bf16 row [1, k]."""
    import jax
    import jax.numpy as jnp
    from check_gemv_kernel import rand_layers

    ws = rand_layers(jax.random.PRNGKey(k + n), (k, n), layers)
    return ws, jax.random.normal(jax.random.PRNGKey(1), (1, k), jnp.float32).astype(jnp.bfloat16)


def header(what):
    import jax

    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}: {what}", flush=True)


def jax_probe(shapes=SHAPES, layers=32):
    """XLA's GEMM and the Pallas GEMV (two forms) in chains of `layers` products, the weights either separate
    arrays (as the model holds them) or slices of one stacked array (as The 2026-11-29 measurement's chains held them)."""
    import jax
    import jax.numpy as jnp
    from check_gemv_kernel import gemv, med_us, next_row

    from spd_jax.model import matmul

    header(f"chains of {layers} products, one row; us per product (GB/s of weight reads)")
    for k, n in shapes:
        ws, x = shape_inputs(k, n, layers)
        nxt = functools.partial(next_row, k=k)

        def xla(x, w, nxt=nxt):
            for i in range(layers):
                x = nxt(matmul(x, w[i]))
            return x

        def pallas(x, w, nxt=nxt, **tune):
            for i in range(layers):
                x = nxt(gemv("x", w[i], x=x, **tune).sum(0))
            return x

        line = f"{k}x{n}:"
        for label, fn, stacked in (("xla", xla, False), ("pallas-dot", pallas, False),
                                   ("pallas-reduce", functools.partial(pallas, mode="reduce"), False),
                                   ("xla stacked", xla, True), ("pallas-dot stacked", pallas, True)):
            w = jnp.stack(ws) if stacked else ws
            t = med_us(jax.jit(fn), x, w, repeats=20) / layers
            line += f" | {label} {t:6.2f} ({k * n * 2 / t / 1e3:4.0f})"
            del w
        print(line, flush=True)
        del ws


BARE_CONFIGS = [  # (label, gemv settings); the first four are Triton's best forms through PyTorch (run 1)
    ("dot bn128 bk64 s4", dict(mode="dot", block_n=128, block_k=64, splits=4)),
    ("reduce bn64 bk256 s4", dict(mode="reduce", block_n=64, block_k=256, splits=4)),
    ("reduce bn64 bk256 s2", dict(mode="reduce", block_n=64, block_k=256, splits=2)),
    ("reduce bn32 bk256 s4", dict(mode="reduce", block_n=32, block_k=256, splits=4)),
    ("dot bn64 (default bk, splits)", dict(block_n=64)),
    ("default", {}),
]


def bare_probe(shapes=SHAPES, layers=32):
    """The Pallas GEMV alone, as run 1 timed Triton through PyTorch: `layers` products of one fixed row with
    distinct weights (separate arrays), no kernel between them; their outputs are summed once at the end."""
    import jax
    from check_gemv_kernel import gemv, med_us

    header(f"Pallas GEMV, {layers} products of one row with distinct weights, nothing between them; us per "
           "product (GB/s of weight reads)")
    for k, n in shapes:
        ws, x = shape_inputs(k, n, layers)
        for label, tune in BARE_CONFIGS:
            def run(x, ws, tune=tune):
                return sum(gemv("x", w, x=x, **tune).sum(0) for w in ws)
            try:
                t = med_us(jax.jit(run), x, ws, repeats=20) / layers
            except Exception as e:  # noqa: BLE001  (a setting Triton refuses: print and go on)
                print(f"{k}x{n} {label}: failed {type(e).__name__}: {str(e)[:150]}", flush=True)
                continue
            print(f"{k}x{n} {label:30s} {t:6.2f} us ({k * n * 2 / t / 1e3:4.0f} GB/s)", flush=True)
        del ws


def kernel_times(f, args, d, reps=3):
    """{kernel name: [total ns, launches]} of `reps` calls of the jitted f, from a jax.profiler trace in d."""
    import collections

    import jax

    f(*args).block_until_ready()
    with jax.profiler.trace(d):
        for _ in range(reps):
            f(*args).block_until_ready()
    per = collections.defaultdict(lambda: [0.0, 0])
    for s, e, name in kernel_events(d):
        per[name][0] += e - s
        per[name][1] += 1
    return per


def kernel_events(d):
    """[(start ns, end ns, name)] of every GPU kernel in the trace in d, by start time."""
    from jax.profiler import ProfileData

    evs = []
    for plane in ProfileData.from_file(sorted(glob_xplanes(d))[-1]).planes:
        if plane.name.startswith("/device:GPU"):
            for ln in plane.lines:
                if "Stream" in ln.name:
                    evs += [(ev.start_ns, ev.end_ns, ev.name) for ev in ln.events]
    return sorted(evs)


def describe(per, units, top):
    """'name xlaunches mean_us; ...' for the `top` kernels by total time, per unit (product or block)."""
    rows = sorted(per.items(), key=lambda kv: -kv[1][0])[:top]
    return "; ".join(f"{name[:40]} x{c / units:.2f} {t / c / 1e3:.2f}" for name, (t, c) in rows)


O_CONFIGS = [  # one split (no partials: each program owns whole columns), as an atomics-based norm would need
    ("dot bn16 s1", dict(block_n=16, splits=1)), ("dot bn32 s1", dict(block_n=32, splits=1)),
    ("reduce bn16 bk256 s1", dict(mode="reduce", block_n=16, block_k=256, splits=1)),
    ("reduce bn32 bk128 s1", dict(mode="reduce", block_n=32, block_k=128, splits=1)),
    ("dot bn64 (default bk, splits)", dict(block_n=64)),
]


def trace_probe(shapes=SHAPES, layers=32, out="/tmp/gemv_traces", configs=None):
    """Device time of each kernel (jax.profiler, CUPTI) in XLA's GEMM chain and in bare Pallas GEMV chains:
    the kernels alone, without launch gaps or the glue between products."""
    import jax
    from check_gemv_kernel import gemv

    from spd_jax.model import matmul

    header(f"kernel device times (CUPTI), chains of {layers} products, 3 runs; per kernel name: launches per "
           "product, mean us")
    for k, n in shapes:
        ws, x = shape_inputs(k, n, layers)

        def xla(x, ws):  # each product's row differs (no merged dots); the scaling fuses into the GEMM
            return sum(matmul(x * (1 + i / 64), w) for i, w in enumerate(ws))

        chains = {"xla": xla}
        for label, tune in configs or BARE_CONFIGS[:2] + BARE_CONFIGS[4:]:
            chains["pallas " + label] = lambda x, ws, tune=tune: sum(gemv("x", w, x=x, **tune).sum(0) for w in ws)
        for label, fn in chains.items():
            per = kernel_times(jax.jit(fn), (x, ws), os.path.join(out, f"{k}x{n}_{label.replace(' ', '_')}"))
            total = sum(v[0] for v in per.values()) / (3 * layers) / 1e3
            if not total:
                print(f"{k}x{n} {label}: no GPU kernels in the trace")
                continue
            print(f"{k}x{n} {label:30s} all kernels {total:6.2f} us/product ({k * n * 2 / total / 1e3:4.0f} GB/s) "
                  f"| {describe(per, 3 * layers, 3)}", flush=True)
        del ws


BLOCK_CONFIGS = [  # (label, kernel_block's tune, tune_o, tune_down, tune_gu)
    ("default", {}, None, None, None),
    ("bn64", {"block_n": 64}, None, None, None),
    ("bn64, o+down bn32 s2", {"block_n": 64}, {"block_n": 32, "splits": 2}, {"block_n": 32, "splits": 2}, None),
    ("dot bn128 bk64 s4, o+down bn32 s2", {"block_n": 128, "block_k": 64, "splits": 4},
     {"block_n": 32, "splits": 2}, {"block_n": 32, "splits": 2}, None),
]


def trace_blocks(out="/tmp/gemv_block_traces"):
    """Wall time and each kernel's device time per block: XLA's block (the default decode path's, without
    attention) against the GEMV-with-prologues block, in chains of 32 blocks (check_gemv_kernel.py)."""
    import numpy as np
    from check_gemv_kernel import LAYERS, block_inputs, chain, kernel_block, med_us, xla_block

    ws, x1, x2 = block_inputs()
    wbytes = sum(int(np.prod(a.shape)) * 2 for a in ws[0].values())
    header(f"{LAYERS} blocks; wall us per block (host, median of 30), kernels' device time per block (CUPTI, 3 "
           "runs), the top kernels (launches per block, mean us)")
    runs = [("xla", chain(xla_block, ws), x2)] + [
        ("kernel " + label, chain(kernel_block, ws, *tunes), x1) for label, *tunes in BLOCK_CONFIGS]
    if "--only" in sys.argv:  # --only xla,bn64: the runs whose label ends with one of these
        keep = sys.argv[sys.argv.index("--only") + 1].split(",")
        runs = [r for r in runs if any(r[0].endswith(k) for k in keep)]
    for label, f, x in runs:
        try:
            wall = med_us(f, x, ws) / LAYERS
            per = kernel_times(f, (x, ws), os.path.join(out, label.replace(" ", "_").replace(",", "")))
        except Exception as e:  # noqa: BLE001  (a setting Triton refuses: print and go on)
            print(f"{label}: failed {type(e).__name__}: {str(e)[:150]}", flush=True)
            continue
        busy = sum(v[0] for v in per.values()) / (3 * LAYERS) / 1e3
        print(f"{label:38s} wall {wall:6.2f} us ({wbytes / wall / 1e3:4.0f} GB/s), kernels {busy:6.2f} us, "
              f"wall - kernels {wall - busy:5.2f} us (mostly the host's per-call dispatch, see --timeline) | "
              f"{describe(per, 3 * LAYERS, 8)}", flush=True)


def glob_xplanes(d):
    import glob
    return glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)


def timeline(out="/tmp/gemv_timeline", blocks=2):
    """The kernels of `blocks` blocks from the middle of one traced chain, in order: each one's gap before it
    and its duration (us), for XLA's block and the prologue block (bn64): where do the gaps sit?"""
    from check_gemv_kernel import LAYERS, block_inputs, chain, kernel_block, med_us, xla_block

    ws, x1, x2 = block_inputs()
    header(f"one chain of {LAYERS} blocks traced once; the kernels of {blocks} blocks from its middle: gap "
           "before each kernel, its duration (us)")
    for label, f, x in (("xla", chain(xla_block, ws), x2),
                        ("kernel bn64", chain(kernel_block, ws, {"block_n": 64}), x1)):
        d = os.path.join(out, label.replace(" ", "_"))
        kernel_times(f, (x, ws), d, reps=1)
        wall = med_us(f, x, ws)
        evs = kernel_events(d)
        if not evs:
            print(f"{label}: no GPU kernels in the trace")
            continue
        span = (max(e for _, e, _ in evs) - evs[0][0]) / 1e3
        busy = sum(e - s for s, e, _ in evs) / 1e3
        gaps, last_end = [], evs[0][1]
        for (s, e, name), prev in zip(evs[1:], evs):
            gaps.append(((s - last_end) / 1e3, prev[2][:30], name[:30]))
            last_end = max(last_end, e)
        big = sorted(gaps, reverse=True)[:4]
        print(f"{label}: host wall {wall:.1f} us per chain (median of 30); its kernels' span {span:.1f} us, sum of "
              f"durations {busy:.1f} us; so {wall - span:.1f} us per chain outside the kernels' span "
              f"({(wall - span) / LAYERS:.2f} us per block); positive gaps inside the span "
              f"{sum(g for g, _, _ in gaps if g > 0):.1f} us; largest: "
              + "; ".join(f"{g:.2f} after {a} before {b}" for g, a, b in big))
        per_block = len(evs) // LAYERS
        mid = (LAYERS // 2) * per_block
        print(f"{label}: {len(evs)} kernels in the run, ~{per_block} per block")
        last_end = max(e for _, e, _ in evs[:mid])
        for s, e, name in evs[mid:mid + blocks * per_block]:
            print(f"  gap {(s - last_end) / 1e3:5.2f}  dur {(e - s) / 1e3:6.2f}  {name[:60]}")
            last_end = max(last_end, e)


def slice_hlo(layers=4, k=4096, n=4096):
    """The optimised HLO of a Pallas GEMV chain on slices of one stacked weight array: what feeds the custom
    calls (a copy of each slice?), against XLA's GEMM chain on the same slices."""
    import jax
    import jax.numpy as jnp
    from check_gemv_kernel import gemv, next_row

    from spd_jax.model import matmul

    ws, x = shape_inputs(k, n, layers)
    stacked = jnp.stack(ws)

    def pallas(x, w):
        for i in range(layers):
            x = next_row(gemv("x", w[i], x=x).sum(0), k)
        return x

    def xla(x, w):
        for i in range(layers):
            x = next_row(matmul(x, w[i]), k)
        return x

    for label, fn in (("pallas on slices", pallas), ("xla on slices", xla)):
        txt = jax.jit(fn).lower(x, stacked).compile().as_text()
        entry = txt[txt.index("ENTRY"):]
        print(f"== {label}: ENTRY instructions")
        for ln in entry.splitlines()[1:]:
            ln = ln.strip()
            if ln.startswith("}"):
                break
            print("  " + ln[:230])


def xla_layout_probe():
    import jax
    import jax.numpy as jnp
    from check_gemv_kernel import med_us, next_row

    header("XLA GEMM, one row, weight [K,N] vs [N,K], chains of 32 distinct weights; us per product")
    for k, n in SHAPES:
        w, x = shape_inputs(k, n, 32)
        wt = [a.T.copy() for a in w]
        nxt = functools.partial(next_row, k=k)

        two = lambda x: jnp.concatenate([x, jnp.zeros_like(x)], axis=0)  # noqa: E731  (model.matmul's 2 rows)

        def kn(x, w, nxt=nxt):
            for i in range(32):
                x = nxt(jnp.dot(two(x), w[i], preferred_element_type=jnp.float32)[:1])
            return x

        def nk(x, w, nxt=nxt):
            for i in range(32):
                x = nxt(jax.lax.dot_general(two(x), w[i], (((1,), (1,)), ((), ())),
                                            preferred_element_type=jnp.float32)[:1])
            return x

        t_kn = med_us(jax.jit(kn), x, w) / 32
        t_nk = med_us(jax.jit(nk), x, wt) / 32
        gb = lambda t, k=k, n=n: k * n * 2 / t / 1e3  # noqa: E731
        print(f"{k}x{n}: [K,N] {t_kn:6.2f} us ({gb(t_kn):5.0f} GB/s)  [N,K] {t_nk:6.2f} us ({gb(t_nk):5.0f} GB/s)",
              flush=True)
        del w, wt


if __name__ == "__main__":
    if "--triton" in sys.argv:
        triton_probe()
    elif "--trace-blocks" in sys.argv:
        trace_blocks()
    elif "--timeline" in sys.argv:
        timeline()
    elif "--slice-hlo" in sys.argv:
        slice_hlo()
    elif "--trace-o" in sys.argv:
        trace_probe(((4096, 4096),), configs=O_CONFIGS)
    elif "--trace" in sys.argv:
        trace_probe(selected_shapes())
    elif "--bare" in sys.argv:
        bare_probe(selected_shapes())
    elif "--jax" in sys.argv:
        jax_probe(selected_shapes())
    elif "--xla-layout" in sys.argv:
        xla_layout_probe()
    else:
        print(__doc__)
