"""Custom kernels for the decode path, each with the pure-JAX path as its reference and fallback.

`decode_attention`: one decode step's attention over the KV cache, our own Pallas kernel (Triton lowering
on GPUs). One program per (sequence x kv head, block of 16 query heads, chunk of the cache) reads the
[B, S, K, hd] cache in place and loops only over the blocks overlapping the sequence's attended slots
[start, end), so its cost follows the filled context rather than the allocated cache. Caches of at most
`SINGLE_PASS_MAX` slots are one chunk and the kernel writes the normalised output itself: a block's decode
attention is one kernel instead of XLA's five (score GEMM, mask, exponential, convert, value GEMM);
longer caches split into chunks that run in parallel (flash-decoding) and are combined in float32. Its
outputs carry the mesh-axis (vma) types that `jax.shard_map(check_vma=True)` requires.

`decode_attention_append`, the decode path's form: the same kernel also writes the step's k/v into the
cache (aliased, so in place) and takes them from registers for the new slot, so XLA computes the step's
q, k and v as one array (one kernel) instead of a RoPE kernel for q and two cache-update kernels.

On other backends both run in Pallas' interpreter (tests), which is slow and only meant for checking equality with the
reference. `resolve_attention_kernel` turns a config's "auto" into the kernel on CUDA GPUs where it
applies (measured faster than XLA's attention on H200: docs/performance.md, 2026-11-29).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp

from spd_jax.config import ATTENTION_KERNEL_CHOICES as KERNEL_CHOICES  # "auto" + ATTENTION_KERNELS
from spd_jax.config import ConfigError

MIN_COMPUTE_CAPABILITY = 8.0  # Triton's bf16 dot (Ampere and newer)

# Caches of at most this many slots are attended in one pass per (sequence, kv head): no split, no combine
# kernels. Longer caches are split by `split_plan` (flash-decoding). Measured on H200: docs/performance.md.
SINGLE_PASS_MAX = 512
NUM_WARPS, NUM_STAGES = 4, 2


def split_plan(cache_len: int, target_splits: int = 16) -> tuple[int, int]:
    """(k_splits, block_k) for a cache of `cache_len` slots (a multiple of 16).

    The kernel loops over a chunk of `cache_len // k_splits` slots in blocks of `block_k` (a power of two,
    16..128, dividing the chunk). Blocks come first: the largest power of two <= 128 dividing the length,
    then the number of chunks is the divisor of the block count nearest `target_splits` (ties: more chunks).
    A plan that took the splits first made lengths with an odd factor degenerate: 2 048 + 128 = 2 176 =
    17 x 128 slots gave 8 chunks of 272 slots in 16-slot blocks (17 dependent iterations per program), and
    the kernel ran 13% slower than the XLA path on 2x H200 (docs/performance.md, 2026-11-28); this plan
    gives 17 chunks of one 128-slot block. Generation allocates the cache in multiples of 128 slots when
    the kernel is on (`generate.KERNEL_CACHE_MULTIPLE`), so the 16-slot fallback (e.g. 4 112 = 257 x 16:
    one chunk of 257 blocks) is only reached by direct calls."""
    if cache_len % 16 or cache_len < 16:
        raise ValueError(f"the decode-attention kernel needs a cache of a multiple of 16 slots, got {cache_len}")
    block_k = max(bk for bk in (128, 64, 32, 16) if cache_len % bk == 0)
    n_blocks = cache_len // block_k
    divisors = [k for k in range(1, n_blocks + 1) if n_blocks % k == 0]
    k_splits = min(divisors, key=lambda k: (abs(k - target_splits), -k))
    return k_splits, block_k


def kernel_supports(head_dim: int) -> bool:
    """Triton's dot needs a power-of-two head dimension of 16..256 (LLaMA, Mistral, OPT, Qwen: 64 or 128)."""
    return 16 <= head_dim <= 256 and head_dim & (head_dim - 1) == 0


def choose_attention_kernel(name: str, head_dim: int, platform: str, compute_capability: str | None) -> str:
    """"xla" or "pallas" for a config's `attention_kernel` on a device of this platform ("gpu", "cpu", ...)
    and CUDA compute capability ("9.0"; None off CUDA). "auto" is the kernel on CUDA GPUs of compute
    capability >= 8.0 where the head dimension suits it (docs/performance.md, 2026-11-29: 2-3% faster
    decode on H200), else XLA's attention; an explicit "pallas" on a GPU with a head dimension the kernel
    cannot take is an error."""
    if name not in KERNEL_CHOICES:
        raise ConfigError(f"attention_kernel must be one of {KERNEL_CHOICES}, got {name!r}")
    if name == "xla":
        return name
    if name == "pallas":  # off GPUs Pallas' interpreter runs it (tests): any head dimension
        if platform == "gpu" and not kernel_supports(head_dim):
            raise ConfigError(f"the Pallas decode-attention kernel needs a power-of-two head dimension of 16..256, "
                              f"this model has {head_dim}: use --attention-kernel xla (or auto)")
        return name
    try:
        cc = float(compute_capability) if compute_capability else 0.0
    except ValueError:  # not a CUDA capability ("gfx90a" on ROCm)
        cc = 0.0
    return "pallas" if platform == "gpu" and cc >= MIN_COMPUTE_CAPABILITY and kernel_supports(head_dim) else "xla"


def resolve_attention_kernel(name: str, head_dim: int) -> str:
    """`choose_attention_kernel` for this process' first device."""
    dev = jax.devices()[0]
    return choose_attention_kernel(name, head_dim, dev.platform, getattr(dev, "compute_capability", None))


def _out_shape(like, shape, dtype):
    """An output shape that varies over the mesh axes `like` varies over: inside `jax.shard_map` with
    check_vma a kernel's outputs must say so (the wrappers of JAX's own Pallas ops do not)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


BLOCK_H = 16  # Triton's dot needs >= 16 rows: the G query heads of a kv head are padded (masked) to 16


@dataclasses.dataclass(frozen=True)
class _Plan:
    k_splits: int  # chunks of the cache, one program each (1: the kernel normalises itself)
    chunk: int  # slots per chunk
    block_k: int  # slots per loop iteration
    num_warps: int
    num_stages: int
    n_hb: int  # programs of BLOCK_H query heads per kv head
    interpret: bool  # Pallas' interpreter (off GPUs): q rows padded instead of masked loads and stores

    @property
    def normalise(self) -> bool:
        return self.k_splits == 1


def _plan(s_len: int, g: int, single_pass_max, block_k, num_warps, num_stages, interpret) -> _Plan:
    """The kernel's plan for a cache of `s_len` slots and `g` query heads per kv head: the arguments (a run's
    `DecodePath.tune`), else the defaults (SINGLE_PASS_MAX, `split_plan`, NUM_WARPS, NUM_STAGES)."""
    from jax.experimental import pallas as pl

    pick = lambda arg, default: default if arg is None else arg  # noqa: E731
    single = pick(single_pass_max, SINGLE_PASS_MAX)
    k_splits, plan_block = (1, split_plan(s_len)[1]) if s_len <= single else split_plan(s_len)
    chunk = s_len // k_splits
    block_k = pick(block_k, plan_block)
    if block_k < 16 or block_k & (block_k - 1) or chunk % block_k:
        raise ValueError(f"block_k must be a power of two >= 16 dividing the chunk of {chunk} slots, got {block_k}")
    if interpret is None:  # Pallas' interpreter off GPUs (tests); False lowers for GPUs (the lowering test)
        interpret = jax.default_backend() != "gpu"
    return _Plan(k_splits, chunk, block_k, pick(num_warps, NUM_WARPS), pick(num_stages, NUM_STAGES),
                 pl.cdiv(g, BLOCK_H), interpret)


def _q_by_kv_head(q_bthd, kh: int, plan: _Plan):
    """Row 0 of q [B, T, H, hd] as [B, K, g_rows, hd] (the G query heads of each kv head) and g_rows. Pallas'
    interpreter cannot pad a masked load past the array under check_vma, so there q's rows are padded with
    zeros (that vary over q's mesh axes) to whole BLOCK_H blocks; on GPUs g_rows = G and the masked loads and
    stores read and write only the G rows."""
    b, _, h, d = q_bthd.shape
    q = q_bthd[:, 0].reshape(b, kh, h // kh, d)
    if not plan.interpret:
        return q, h // kh
    g_rows = plan.n_hb * BLOCK_H
    zero = jnp.zeros_like(q[:, :, :1])
    return jnp.concatenate([q, jnp.zeros((b, kh, g_rows - h // kh, d), q.dtype) + zero], axis=2), g_rows


def _load_q(ref, rows, row_ok, masked: bool):
    from jax.experimental.pallas import triton as plgpu

    return plgpu.load(ref.at[rows, :], mask=row_ok[:, None]) if masked else ref[rows, :]


def _attend_chunk(q, k_ref, v_ref, base: int, start, end, *, sm_scale: float, block_k: int, chunk: int):
    """Online softmax of q [BLOCK_H, hd] over the slots [start, end) of this chunk (slots base..base+chunk),
    visiting only the blocks of `block_k` slots that overlap them -> (o float32 unnormalised, m, l)."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    lo = jnp.maximum(start - base, 0) // block_k
    hi = jnp.minimum(pl.cdiv(end - base, block_k), chunk // block_k)
    neg = jnp.finfo(jnp.float32).min

    def body(i, carry):
        o, m, l = carry
        slots = pl.ds(i * block_k, block_k)
        s = plgpu.dot(q, k_ref[slots, :], trans_b=True) * sm_scale  # [BLOCK_H, block_k] float32
        idx = base + i * block_k + jnp.arange(block_k)
        s = jnp.where(((idx >= start) & (idx < end))[None, :], s, neg)
        m_new = jnp.maximum(m, s.max(axis=1))
        corr = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        v = v_ref[slots, :]
        return o * corr[:, None] + plgpu.dot(p.astype(v.dtype), v), m_new, l * corr + p.sum(axis=1)

    hd = q.shape[-1]
    init = (jnp.zeros((BLOCK_H, hd), jnp.float32), jnp.full((BLOCK_H,), neg, jnp.float32),
            jnp.zeros((BLOCK_H,), jnp.float32))
    return lax.fori_loop(lo, hi, body, init)


def _store_result(o_refs, o, m, l, row_ok, *, normalise: bool, masked: bool):
    """normalise: softmax(q k^T) v into o_refs = (o,); else the float32 partials into (o, l, m)."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    rows = pl.ds(0, BLOCK_H)

    def store(ref, x, mask):
        if masked:
            plgpu.store(ref, x, mask=mask)
        else:
            ref[...] = x

    if normalise:  # the first block overlapping [start, end) holds an attended slot, so l > 0
        (o_ref,) = o_refs
        store(o_ref.at[rows, :], (o / l[:, None]).astype(o_ref.dtype), row_ok[:, None])
    else:
        o_ref, l_ref, m_ref = o_refs
        store(o_ref.at[rows, :], o, row_ok[:, None])
        store(l_ref.at[rows], l, row_ok)
        store(m_ref.at[rows], m, row_ok)


def _attention_kernel(q_ref, k_ref, v_ref, start_ref, end_ref, *out_refs, sm_scale: float, block_k: int,
                      n_q: int, chunk: int, normalise: bool, masked: bool):
    """One program: one sequence, one kv head, up to BLOCK_H of its query heads, one chunk of the cache.

    q_ref [>= BLOCK_H rows (masked), hd]; k_ref/v_ref [chunk, hd] (this kv head's slots of the chunk, read in
    place from the [B, S, K, hd] cache); start_ref/end_ref: this sequence's attended slots [start, end).
    masked: q and the outputs have fewer than BLOCK_H rows, so loads and stores are masked to the `n_q`
    real ones (False: the caller padded them, as for Pallas' interpreter)."""
    from jax.experimental import pallas as pl

    i_h, j = pl.program_id(1), pl.program_id(2)
    row_ok = jnp.arange(BLOCK_H) < n_q - i_h * BLOCK_H
    q = _load_q(q_ref, pl.ds(0, BLOCK_H), row_ok, masked)
    o, m, l = _attend_chunk(q, k_ref, v_ref, j * chunk, start_ref[()], end_ref[()], sm_scale=sm_scale,
                            block_k=block_k, chunk=chunk)
    _store_result(out_refs, o, m, l, row_ok, normalise=normalise, masked=masked)


def _append_kernel(qkv_ref, k_ref, v_ref, start_ref, slot_ref, *out_refs, sm_scale: float, block_k: int,
                   g: int, g_rows: int, n_hb: int, chunk: int, k_splits: int, normalise: bool, masked: bool):
    """`_attention_kernel` for a step whose own k/v are not yet in the cache: attends over the cache slots
    [start, slot) plus the new k/v (from registers), and writes the new k/v into slot `slot` of the cache
    (outputs aliased to the cache inputs), once per (sequence, kv head).

    qkv_ref [g_rows + 2, hd]: this sequence's and kv head's new q heads (g real rows of g_rows), then its
    new k and v rows (static offsets: no row offset depends on the program id when n_hb = 1)."""
    from jax import lax
    from jax.experimental import pallas as pl

    i_h, j = pl.program_id(1), pl.program_id(2)
    row_ok = jnp.arange(BLOCK_H) < g - i_h * BLOCK_H
    q = _load_q(qkv_ref, pl.ds(i_h * BLOCK_H if n_hb > 1 else 0, BLOCK_H), row_ok, masked)
    k_new = qkv_ref[pl.ds(g_rows, 1), :]  # [1, hd]
    v_new = qkv_ref[pl.ds(g_rows + 1, 1), :]
    *o_refs, k_out, v_out = out_refs
    base = j * chunk
    start, slot = start_ref[()], slot_ref[()]

    @pl.when((i_h == 0) & (j == slot // chunk))
    def _():  # the cache write of this step (the attention below never reads slot `slot` from the cache)
        k_out[pl.ds(slot - base, 1), :] = k_new.astype(k_out.dtype)
        v_out[pl.ds(slot - base, 1), :] = v_new.astype(v_out.dtype)

    o, m, l = _attend_chunk(q, k_ref, v_ref, base, start, slot, sm_scale=sm_scale, block_k=block_k, chunk=chunk)
    last = j == k_splits - 1

    def new_slot(_, carry):  # the new slot, in the last chunk only (a one-trip loop: Pallas' interpreter
        o, m, l = carry      # under shard_map refuses constants mixed with varying values outside loops)
        s_new = (q.astype(jnp.float32) * k_new.astype(jnp.float32)).sum(axis=1) * sm_scale  # [BLOCK_H]
        m2 = jnp.where(last, jnp.maximum(m, s_new), m)
        corr = jnp.exp(m - m2)
        p_new = jnp.where(last, jnp.exp(s_new - m2), 0.0)
        return o * corr[:, None] + p_new[:, None] * v_new.astype(jnp.float32), m2, l * corr + p_new

    o, m, l = lax.fori_loop(0, 1, new_slot, (o, m, l))
    _store_result(o_refs, o, m, l, row_ok, normalise=normalise, masked=masked)


def _call(kernel, plan: _Plan, b: int, kh: int, g_rows: int, d: int, like, out_dtype, first_spec, args,
          extra_shapes=(), aliases=None, name="spd_decode_attention"):
    """The pallas_call of both kernels: grid (sequence x kv head, query-head block, chunk), the cache read in
    place by its index maps, and the output (normalised, or the chunks' partials combined here in float32)
    -> (out [B, K, g_rows, hd], *extra outputs: cache-shaped, written through the cache's block specs)."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    kv_spec = pl.BlockSpec((None, plan.chunk, None, d), lambda bk, i, j: (bk // kh, j, bk % kh, 0))
    seq_spec = pl.BlockSpec((None,), lambda bk, i, j: (bk // kh,))
    if plan.normalise:
        o_specs = [pl.BlockSpec((None, None, BLOCK_H, d), lambda bk, i, j: (bk // kh, bk % kh, i, 0))]
        o_shapes = [_out_shape(like, (b, kh, g_rows, d), out_dtype)]
    else:
        o_specs = [pl.BlockSpec((None, None, None, BLOCK_H, d), lambda bk, i, j: (bk // kh, bk % kh, j, i, 0)),
                   pl.BlockSpec((None, None, None, BLOCK_H), lambda bk, i, j: (bk // kh, bk % kh, j, i)),
                   pl.BlockSpec((None, None, None, BLOCK_H), lambda bk, i, j: (bk // kh, bk % kh, j, i))]
        parts = (b, kh, plan.k_splits, g_rows)
        o_shapes = [_out_shape(like, parts + (d,), jnp.float32), _out_shape(like, parts, jnp.float32),
                    _out_shape(like, parts, jnp.float32)]
    n_o = len(o_shapes)
    outs = pl.pallas_call(
        kernel, grid=(b * kh, plan.n_hb, plan.k_splits),
        in_specs=[first_spec, kv_spec, kv_spec, seq_spec, seq_spec],
        out_specs=o_specs + [kv_spec] * len(extra_shapes), out_shape=o_shapes + list(extra_shapes),
        input_output_aliases={k: n_o + v for k, v in (aliases or {}).items()},
        compiler_params=plgpu.CompilerParams(num_warps=plan.num_warps, num_stages=plan.num_stages),
        interpret=plan.interpret, name=name,
    )(*args)
    if plan.normalise:
        return (outs[0], *outs[1:])
    o_part, l_part, m_part = outs[:3]  # flash-decoding's combine of the chunks, in float32
    m_max = lax.optimization_barrier(m_part.max(axis=2))  # as JAX's wrapper: no NaNs after fusion
    corr = jnp.exp(m_part - m_max[:, :, None])
    o = (o_part * corr[..., None]).sum(axis=2) / (l_part * corr).sum(axis=2)[..., None]
    return (o, *outs[3:])


def _merge_heads(o_bkgd, b: int, t: int, h: int, d: int, g: int, dtype):
    """[B, K, >= G, hd] -> [B, T, H * hd] (q head h = k * G + g; the T identical rows)."""
    o = o_bkgd[:, :, :g]
    return jnp.broadcast_to(o.reshape(b, 1, h * d), (b, t, h * d)).astype(dtype)


def decode_attention(q_bthd, k_bskd, v_bskd, start_b, end_b, *, single_pass_max: int | None = None,
                     block_k: int | None = None, num_warps: int | None = None, num_stages: int | None = None,
                     interpret: bool | None = None):
    """Attention of one decode position per sequence over cache slots [start_b, end_b) -> [B, T, H * hd].

    q_bthd: [B, T, H, hd] where the T rows are identical (T = 1, or the shadow row's 2); k/v: the layer's
    cache [B, S, K, hd] with this step's k/v already written; start_b/end_b: [B] int32 (end > start).
    GQA: q head h uses kv head h // (H / K), as in `model.attention_probs`.

    One program per (sequence, kv head, block of 16 query heads, chunk of the cache), reading the cache in
    place (no transposed copy). Caches of at most `single_pass_max` slots (default `SINGLE_PASS_MAX`) are
    one chunk: the kernel normalises and writes the output itself, so a decode step's attention is one
    kernel. Longer caches split into chunks by `split_plan`, combined here in float32. block_k (slots per
    loop iteration, a power of two >= 16 dividing the chunk; default the plan's), num_warps, num_stages:
    Triton settings; each unset one is the default above (a run sets them through `DecodePath.tune`)."""
    from jax.experimental import pallas as pl

    b, t, h, d = q_bthd.shape
    kh = k_bskd.shape[2]
    g = h // kh
    plan = _plan(k_bskd.shape[1], g, single_pass_max, block_k, num_warps, num_stages, interpret)
    q, g_rows = _q_by_kv_head(q_bthd, kh, plan)
    kernel = functools.partial(_attention_kernel, sm_scale=1.0 / math.sqrt(d), block_k=plan.block_k, n_q=g,
                               chunk=plan.chunk, normalise=plan.normalise, masked=not plan.interpret)
    q_spec = pl.BlockSpec((None, None, BLOCK_H, d), lambda bk, i, j: (bk // kh, bk % kh, i, 0))
    (o,) = _call(kernel, plan, b, kh, g_rows, d, q, v_bskd.dtype, q_spec,
                 (q, k_bskd, v_bskd, start_b.astype(jnp.int32), end_b.astype(jnp.int32)))
    return _merge_heads(o, b, t, h, d, g, v_bskd.dtype)


def decode_attention_append(q_bthd, k_btkd, v_btkd, k_cache, v_cache, start_b, slot, *,
                            single_pass_max: int | None = None, block_k: int | None = None,
                            num_warps: int | None = None, num_stages: int | None = None,
                            interpret: bool | None = None):
    """A decode step's cache write and attention in one kernel -> (out [B, T, H * hd], k_cache, v_cache).

    q/k/v: this step's projections [B, T, heads, hd] after RoPE (the T rows identical; row 0 is used and
    written); k_cache/v_cache [B, S, K, hd]: the layer's cache before this step; start_b [B]: each
    sequence's first attended slot; slot: the cache slot of this step (scalar; every sequence attends
    [start_b, slot]). The new k/v are written into `slot` by the kernel (the caches are aliased to its
    outputs, so in the decode loop the update is in place), and the attention takes them from registers,
    so XLA computes q, k and v of the step as one array (one fusion instead of a RoPE kernel for q and two
    cache-update kernels). Same plan and settings as `decode_attention`."""
    from jax.experimental import pallas as pl

    b, t, h, d = q_bthd.shape
    kh = k_cache.shape[2]
    g = h // kh
    plan = _plan(k_cache.shape[1], g, single_pass_max, block_k, num_warps, num_stages, interpret)
    # per kv head: its G query heads, then its new k and v (one concatenation: one XLA fusion with RoPE)
    q, g_rows = _q_by_kv_head(q_bthd, kh, plan)
    qkv = jnp.concatenate([q, k_btkd[:, 0, :, None].astype(q.dtype), v_btkd[:, 0, :, None].astype(q.dtype)],
                          axis=2)  # [B, K, g_rows + 2, hd]
    kernel = functools.partial(_append_kernel, sm_scale=1.0 / math.sqrt(d), block_k=plan.block_k, g=g,
                               g_rows=g_rows, n_hb=plan.n_hb, chunk=plan.chunk, k_splits=plan.k_splits,
                               normalise=plan.normalise, masked=not plan.interpret)
    qkv_spec = pl.BlockSpec((None, None, g_rows + 2, d), lambda bk, i, j: (bk // kh, bk % kh, 0, 0))
    slot_b = jnp.broadcast_to(jnp.asarray(slot, jnp.int32), (b,))
    o, k_new_cache, v_new_cache = _call(
        kernel, plan, b, kh, g_rows, d, qkv, v_cache.dtype, qkv_spec,
        (qkv, k_cache, v_cache, start_b.astype(jnp.int32), slot_b),
        extra_shapes=(_out_shape(k_cache, k_cache.shape, k_cache.dtype),
                      _out_shape(v_cache, v_cache.shape, v_cache.dtype)),
        aliases={1: 0, 2: 1}, name="spd_decode_attention_append")
    return _merge_heads(o, b, t, h, d, g, v_cache.dtype), k_new_cache, v_new_cache
