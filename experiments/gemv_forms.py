#!/usr/bin/env python
"""Which formulation of a batch-1 matrix-vector product does XLA:GPU turn into a fast kernel?

XLA's GPU algebraic simplifier rewrites a vector x matrix `dot` into multiply + reduce when the operands
hold fewer than ~10M elements (a LLaMA-2-7B attention projection shard at TP 2 is 4096 x 2048 = 8.4M),
and those reduce kernels run far below memory bandwidth. This times chains of 32 such products with
distinct weights (so nothing stays in L2) in several formulations and prints GB/s of weight reads and
the kind of kernel XLA emitted.
"""

from __future__ import annotations

import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

N_LAYERS = 32


def pad_rows(x):
    return jnp.concatenate([x, jnp.zeros_like(x)], axis=0)


FORMS = {
    # name: (weight layout, function(x [1, K], w) -> [1, N])
    "einsum_io": ("io", lambda x, w: jnp.einsum("bi,io->bo", x, w)),
    "einsum_oi": ("oi", lambda x, w: jnp.einsum("bi,oi->bo", x, w)),
    "pad2_io": ("io", lambda x, w: jnp.einsum("bi,io->bo", pad_rows(x), w)[:1]),
    "pad2_oi": ("oi", lambda x, w: jnp.einsum("bi,oi->bo", pad_rows(x), w)[:1]),
    "f32acc_io": ("io", lambda x, w: jnp.einsum("bi,io->bo", x, w, preferred_element_type=jnp.float32
                                                ).astype(x.dtype)),
}


def kernel_kinds(hlo: str) -> str:
    kinds = {k: len(re.findall(k, hlo)) for k in ("gemm_fusion", "__cublas", "triton", "reduce_fusion",
                                                  "multiply_fusion")}
    return " ".join(f"{k}={v}" for k, v in kinds.items() if v)


def bench(form: str, k: int, n: int, repeats: int = 30):
    layout, mm = FORMS[form]
    key = jax.random.PRNGKey(0)
    shape = (k, n) if layout == "io" else (n, k)
    ws = [(0.02 * jax.random.normal(jax.random.fold_in(key, i), shape, jnp.float32)).astype(jnp.bfloat16)
          for i in range(N_LAYERS)]

    def chain(x, ws):
        acc = jnp.zeros((1, n), jnp.float32)
        for w in ws:
            y = mm(x, w)
            acc = acc + y.astype(jnp.float32)
            x = x + y[:, :k].astype(x.dtype) if n >= k else x * 1.0001
        return acc

    f = jax.jit(chain)
    x = jax.random.normal(key, (1, k), jnp.float32).astype(jnp.bfloat16)
    hlo = f.lower(x, ws).compile().as_text()
    f(x, ws).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(x, ws).block_until_ready()
        ts.append(time.perf_counter() - t0)
    t = float(np.median(ts))
    nbytes = N_LAYERS * k * n * 2
    return t * 1e3, nbytes / t / 1e9, kernel_kinds(hlo)


def check_correct(form: str, k=512, n=256):
    layout, mm = FORMS[form]
    rng = np.random.RandomState(1)
    x = rng.randn(1, k).astype(np.float32)
    w = rng.randn(k, n).astype(np.float32)
    wl = w if layout == "io" else w.T
    y = np.asarray(jax.jit(mm)(jnp.asarray(x, jnp.bfloat16), jnp.asarray(wl, jnp.bfloat16)), np.float32)
    ref = x.astype(np.float64) @ w.astype(np.float64)
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def main():
    shapes = [(4096, 2048), (2048, 4096), (4096, 4096), (4096, 5504), (4096, 6144)]
    if len(sys.argv) > 1:
        shapes = [tuple(int(v) for v in s.split("x")) for s in sys.argv[1:]]
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; chains of {N_LAYERS} products, bf16")
    print(f"{'form':10s} {'K x N':>12s} {'ms':>8s} {'GB/s':>7s}  rel.err  kernels")
    for form in FORMS:
        err = check_correct(form)
        for k, n in shapes:
            ms, gbs, kinds = bench(form, k, n)
            print(f"{form:10s} {f'{k}x{n}':>12s} {ms:8.3f} {gbs:7.0f}  {err:.1e}  {kinds}")


if __name__ == "__main__":
    main()
