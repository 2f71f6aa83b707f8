#!/usr/bin/env python
"""On a GPU: the Pallas decode-attention kernel (spd_jax/kernels.py) against XLA's masked attention
(`model.attention_core`, the default decode path), for equality and for time. RANDOM data.

For each case (cache slots, kv heads, query heads per kv head, plan) it prints the largest difference
from a float32 reference of the same bf16 inputs, for the kernel and for XLA's path, and the time of one
attention in a chain of 32 layers' caches (so nothing stays in L2), both run side by side in this process.

  python scripts/check_attention_kernel.py            # LLaMA-2-7B (TP 1, 2, 4) and 70B-like heads
  python scripts/check_attention_kernel.py --sweep    # Triton settings of the kernel, 7B TP 1 heads
  python scripts/check_attention_kernel.py --append   # the cache-writing kernel of the decode path
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from spd_jax.measure import host_times  # noqa: E402
from spd_jax.kernels import decode_attention, decode_attention_append  # noqa: E402
from spd_jax.model import attention_core  # noqa: E402

LAYERS = 32


def reference(q, k, v, start, end):
    """float32 masked softmax attention of one query row per sequence (GQA), from the same bf16 values."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    qf = q[:, 0].astype(jnp.float32).reshape(b, kh, h // kh, d)
    s = jnp.einsum("bkgd,bskd->bkgs", qf, k.astype(jnp.float32)) / np.sqrt(d)
    slots = jnp.arange(k.shape[1])
    ok = (slots[None] >= start[:, None]) & (slots[None] < end[:, None])
    p = jax.nn.softmax(jnp.where(ok[:, None, None], s, -jnp.inf), axis=-1)
    o = jnp.einsum("bkgs,bskd->bkgd", p, v.astype(jnp.float32))
    return jnp.broadcast_to(o.reshape(b, 1, h * d), (b, t, h * d))


def xla_path(q, k, v, start, end):
    slots = jnp.arange(k.shape[1])
    mask = ((slots[None] >= start[:, None]) & (slots[None] < end[:, None]))[:, None, :]  # [B, T=1, S]
    mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[1], k.shape[1]))
    return attention_core(q, k, v, mask)


def timed(f, *args, repeats=20):
    return float(np.median(host_times(f, *args, repeats=repeats)))


def case(slots, kh, g, filled, single_pass_max=None, t=2, d=128, time_xla=True, **tune):
    key = jax.random.PRNGKey(slots + kh + g)
    ks = jax.random.split(key, 3)
    q = jax.random.normal(ks[0], (1, 1, kh * g, d), jnp.float32).astype(jnp.bfloat16)
    q = jnp.repeat(q, t, axis=1)
    caches = [(jax.random.normal(jax.random.fold_in(ks[1], i), (1, slots, kh, d), jnp.float32).astype(jnp.bfloat16),
               jax.random.normal(jax.random.fold_in(ks[2], i), (1, slots, kh, d), jnp.float32).astype(jnp.bfloat16))
              for i in range(LAYERS)]
    start, end = jnp.array([0], jnp.int32), jnp.array([filled], jnp.int32)
    kern = lambda q, k, v, s, e: decode_attention(q, k, v, s, e, single_pass_max=single_pass_max, **tune)  # noqa: E731
    k0, v0 = caches[0]
    ref = reference(q, k0, v0, start, end)
    err = {name: float(jnp.max(jnp.abs(jax.jit(f)(q, k0, v0, start, end).astype(jnp.float32) - ref)))
           for name, f in (("pallas", kern), ("xla", xla_path))}

    def chain(f):
        def run(q, caches, s, e):
            acc = jnp.zeros(q.shape[:2] + (q.shape[2] * q.shape[3],), jnp.float32)
            for k, v in caches:  # each layer's query depends on the last output: no overlap between layers
                o = f(q, k, v, s, e)
                acc = acc + o.astype(jnp.float32)
                q = q + (o.reshape(q.shape) * 1e-3).astype(q.dtype)
            return acc
        return jax.jit(run)

    t_k = timed(chain(kern), q, caches, start, end) / LAYERS
    t_x = timed(chain(xla_path), q, caches, start, end) / LAYERS if time_xla else float("nan")
    plan = "one pass" if (single_pass_max if single_pass_max is not None else 512) >= slots else "split"
    plan += "".join(f" {k}={v}" for k, v in tune.items())
    print(f"| {slots} | {filled} | {kh} | {g} | {plan} | {err['pallas']:.2e} | {err['xla']:.2e} | "
          f"{t_k * 1e6:.1f} | {t_x * 1e6:.1f} | {t_x / t_k:.2f} |", flush=True)
    return err["pallas"]


SWEEP = [dict(), dict(num_stages=1), dict(num_stages=3), dict(num_warps=8), dict(block_k=64),
         dict(block_k=64, num_stages=3), dict(block_k=256, num_warps=8, num_stages=1),
         dict(block_k=256, num_warps=4, num_stages=1), dict(single_pass_max=0), dict(single_pass_max=0, block_k=64)]


def sweep():
    """Triton settings of the kernel for LLaMA-2-7B TP 1 heads (one sequence, 32 kv heads, 200 of 256 slots)."""
    print("| cache slots | filled | kv heads | q heads per kv | kernel plan | max err kernel | max err XLA | "
          "kernel us | XLA us | XLA / kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for i, tune in enumerate(SWEEP):
        case(256, 32, 1, 200, time_xla=i in (0, len(SWEEP) - 1), **tune)


def check_append(slots, kh, g, slot, single_pass_max=None, d=128):
    """The cache-writing kernel (the decode path's): its output against the float32 reference over the cache
    with this step's k/v written, and its caches against XLA's dynamic_update_slice, bit for bit."""
    ks = jax.random.split(jax.random.PRNGKey(slots + g), 5)
    bf = lambda k, shape: jax.random.normal(k, shape, jnp.float32).astype(jnp.bfloat16)  # noqa: E731
    q = jnp.repeat(bf(ks[0], (1, 1, kh * g, d)), 2, axis=1)
    kn, vn = bf(ks[1], (1, 1, kh, d)), bf(ks[2], (1, 1, kh, d))
    kc, vc = bf(ks[3], (1, slots, kh, d)), bf(ks[4], (1, slots, kh, d))
    start = jnp.array([0], jnp.int32)
    f = jax.jit(lambda *a: decode_attention_append(*a, single_pass_max=single_pass_max))
    out, k2, v2 = f(q, kn, vn, kc, vc, start, jnp.int32(slot))
    ck = jax.lax.dynamic_update_slice(kc, kn, (0, slot, 0, 0))
    cv = jax.lax.dynamic_update_slice(vc, vn, (0, slot, 0, 0))
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - reference(q, ck, cv, start, jnp.array([slot + 1])))))
    same = bool(jnp.array_equal(k2, ck) and jnp.array_equal(v2, cv))
    print(f"| append | {slots} | {slot + 1} | {kh} | {g} | {err:.2e} | caches {'equal' if same else 'DIFFER'} |",
          flush=True)
    return err if same else float("inf")


def main(argv=None):
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sweep", action="store_true", help="time the kernel's Triton settings (7B TP 1 heads)")
    mode.add_argument("--append", action="store_true", help="check the cache-writing kernel of the decode path")
    args = p.parse_args(argv)
    if args.sweep:
        return sweep()
    if args.append:
        worst = max(check_append(*c) for c in [(256, 32, 1, 199), (256, 8, 8, 130), (2176, 32, 1, 2099),
                                               (256, 32, 1, 0), (256, 16, 1, 255)])
        print(f"largest append-kernel error {worst:.2e}: {'OK' if worst < 2e-2 else 'TOO LARGE or caches differ'}")
        return 0 if worst < 2e-2 else 1
    print(f"# {jax.devices()[0].device_kind}, JAX {jax.__version__}; times are one attention in a chain of "
          f"{LAYERS} (us, includes the chain's add)")
    print("| cache slots | filled | kv heads | q heads per kv | kernel plan | max err kernel | max err XLA | "
          "kernel us | XLA us | XLA / kernel |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    worst = 0.0
    for slots, kh, g, filled, spm in [(256, 32, 1, 200, None), (256, 32, 1, 200, 0), (256, 16, 1, 200, None),
                                      (256, 8, 1, 200, None), (256, 8, 8, 200, None), (256, 4, 8, 200, None),
                                      (2176, 32, 1, 2100, None), (2176, 32, 1, 2100, 4096),
                                      (2176, 8, 1, 2100, None)]:
        worst = max(worst, case(slots, kh, g, filled, spm))
    ok = worst < 2e-2
    print(f"largest kernel error {worst:.2e}: {'OK' if ok else 'TOO LARGE'} (bf16 output, tolerance 2e-2)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
