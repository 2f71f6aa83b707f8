"""Custom kernels for the decode path, each with the pure-JAX path as its reference and fallback.

`decode_attention`: one decode step's attention over the KV cache with the kernel of JAX's own Pallas GQA
decode attention (`jax.experimental.pallas.ops.gpu.decode_attention`: flash-decoding, the cache split
into up to 16 chunks that run in parallel and are combined at the end). We call its kernel body with
our own `pallas_call`, whose outputs carry the mesh-axis (vma) types that `jax.shard_map(check_vma=True)`
requires; the partial outputs stay float32 until the combine. It reads only the slots [start, end) of each
sequence, so its cost follows the filled context rather than the allocated cache, and it replaces the
masked score GEMM, softmax reductions and value GEMM of `model.attention_core` by one kernel (plus the
split combine). On GPUs it compiles through Pallas' Triton lowering; on other backends it runs in
Pallas' interpreter (tests), which is slow and only meant for checking equality with the reference.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

ATTENTION_KERNELS = ("xla", "pallas")


def split_plan(cache_len: int, target_splits: int = 16) -> tuple[int, int]:
    """(k_splits, block_k) for a cache of `cache_len` slots (a multiple of 16).

    The kernel loops over a chunk of `cache_len // k_splits` slots in blocks of `block_k` (a power of two,
    16..128, dividing the chunk). Blocks come first: the largest power of two <= 128 dividing the length,
    then the number of chunks is the divisor of the block count nearest `target_splits` (ties: more chunks).
    A plan that took the splits first made lengths with an odd factor degenerate: 2 048 + 128 = 2 176 =
    17 x 128 slots gave 8 chunks of 272 slots in 16-slot blocks (17 dependent iterations per program), and
    the kernel ran 13% slower than the XLA path on 2x H200 (docs/performance.md, session 9); this plan
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


def _out_shape(like, shape, dtype):
    """An output shape that varies over the mesh axes `like` varies over: inside `jax.shard_map` with
    check_vma a kernel's outputs must say so (JAX's own wrapper of this kernel does not)."""
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=jax.typeof(like).manual_axis_type)


def _decode_attention_one(q_hd, k_sd, v_sd, start, end, *, k_splits: int, block_k: int, block_h: int = 16,
                          num_warps: int = 4, num_stages: int = 2):
    """One sequence and kv head: q [G, hd] (its query heads), k/v [S, hd]. The kernel body is JAX's
    (`decode_attention.attn_forward_kernel`); the call and the final combine follow JAX's
    `decode_attn_unbatched`, with vma-typed outputs."""
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu
    from jax.experimental.pallas.ops.gpu.decode_attention import attn_forward_kernel

    g, d = q_hd.shape
    s = k_sd.shape[0]
    chunk = s // k_splits
    k = k_sd.reshape(k_splits, chunk, d)
    v = v_sd.reshape(k_splits, chunk, d)
    kernel = functools.partial(attn_forward_kernel, sm_scale=1.0 / math.sqrt(d), block_k=block_k,
                               block_h=block_h, num_heads=g)
    o, l, m = pl.pallas_call(
        kernel,
        grid=(pl.cdiv(g, block_h), k_splits),
        in_specs=[pl.BlockSpec((block_h, d), lambda i, j: (i, 0)),
                  pl.BlockSpec((None, chunk, d), lambda i, j: (j, 0, 0)),
                  pl.BlockSpec((None, chunk, d), lambda i, j: (j, 0, 0)),
                  pl.BlockSpec((), lambda i, j: ()),
                  pl.BlockSpec((), lambda i, j: ())],
        out_specs=[pl.BlockSpec((None, block_h, d), lambda i, j: (j, i, 0)),
                   pl.BlockSpec((None, block_h), lambda i, j: (j, i)),
                   pl.BlockSpec((None, block_h), lambda i, j: (j, i))],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        out_shape=[_out_shape(q_hd, (k_splits, g, d), jnp.float32),
                   _out_shape(q_hd, (k_splits, g), jnp.float32),
                   _out_shape(q_hd, (k_splits, g), jnp.float32)],
        interpret=jax.default_backend() != "gpu",
        name="spd_decode_attention",
    )(q_hd, k, v, start, end)
    m_next = lax.optimization_barrier(m.max(axis=0))  # JAX's wrapper: the barrier avoids NaNs after fusion
    corr = jnp.exp(m - m_next[None])
    o = (o.astype(jnp.float32) * corr[:, :, None]).sum(axis=0)
    l_next = (l * corr).sum(axis=0)
    return o / (l_next[:, None] + jnp.finfo(jnp.float32).eps)


def decode_attention(q_bthd, k_bskd, v_bskd, start_b, end_b):
    """Attention of one decode position per sequence over cache slots [start_b, end_b) -> [B, T, H * hd].

    q_bthd: [B, T, H, hd] where the T rows are identical (T = 1, or the shadow row's 2); k/v: the layer's
    cache [B, S, K, hd] with this step's k/v already written; start_b/end_b: [B] int32 (end > start).
    GQA: q head h uses kv head h // (H / K), as in `model.attention_probs`."""
    b, t, h, d = q_bthd.shape
    kh = k_bskd.shape[2]
    k_splits, block_k = split_plan(k_bskd.shape[1])
    one = functools.partial(_decode_attention_one, k_splits=k_splits, block_k=block_k)
    q = q_bthd[:, 0].reshape(b, kh, h // kh, d)
    per_head = jax.vmap(one, in_axes=(0, 1, 1, None, None))  # over kv heads: k/v [S, K, hd] -> [S, hd]
    o = jax.vmap(per_head)(q, k_bskd, v_bskd, start_b, end_b)  # [B, K, G, hd] float32
    return jnp.broadcast_to(o.reshape(b, 1, h * d), (b, t, h * d)).astype(v_bskd.dtype)
