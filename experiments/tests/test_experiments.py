"""Tests of the experiments (not run by the project's test command: `python -m pytest experiments/tests`)."""

import os
import subprocess
import sys
from pathlib import Path

import chex
import numpy as np
import pytest

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def test_peer_store_probe_script_traces_its_kernel():
    """experiments/probe_p2p_allreduce.py (docs/performance.md, 2026-11-28) stays runnable: off GPUs it traces its
    Mosaic GPU kernel at TP 2 and says that it did only that (the kernel itself runs on GPUs only)."""
    root = Path(__file__).resolve().parents[2]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    r = subprocess.run([sys.executable, str(root / "experiments/probe_p2p_allreduce.py")], capture_output=True,
                       text=True, env=env, cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "p2p probe on 2 x cpu, 1 processes: traced only (no GPU)" in r.stdout


@pytest.mark.parametrize("splits", [1, 3])
def test_the_gemv_experiment_computes_what_it_times(splits):
    """experiments/check_gemv_kernel.py (docs/performance.md, 2026-11-29) times Pallas GEMVs whose
    prologues build their row from producers' partials; in Pallas' interpreter each equals float64 NumPy:
    a plain row, residual + partials with RMSNorm's 1/rms (and the new residual row, rounded to its bf16
    dtype), and silu(gate) x up from gate/up partials (each rounded to bf16 as the reference path rounds)."""
    import importlib.util
    from pathlib import Path

    import jax.numpy as jnp

    path = Path(__file__).resolve().parents[1] / "check_gemv_kernel.py"
    spec = importlib.util.spec_from_file_location("check_gemv_kernel", path)
    exp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(exp)

    rng = np.random.RandomState(4)
    k, n, f, eps = 96, 80, 48, 1e-5
    bf16 = lambda a: np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32), np.float64)  # noqa: E731
    w = bf16(rng.randn(k, n) * 0.1)
    x = bf16(rng.randn(1, k))
    out = exp.gemv("x", jnp.asarray(w, jnp.bfloat16), x=jnp.asarray(x, jnp.bfloat16), splits=splits, block_n=16,
                   block_k=16)
    chex.assert_shape(out, (splits, 1, n))
    np.testing.assert_allclose(np.asarray(out).sum(0), x @ w, rtol=1e-5, atol=1e-5)

    res, parts = bf16(rng.randn(1, k) * 2), rng.randn(2, 1, k).astype(np.float32)
    out, res_new = exp.gemv("norm", jnp.asarray(w, jnp.bfloat16), res=jnp.asarray(res, jnp.bfloat16),
                            parts=jnp.asarray(parts), eps=eps, splits=splits, block_n=16, block_k=16)
    h = bf16(res + parts.sum(0))
    np.testing.assert_array_equal(np.asarray(res_new.astype(jnp.float32)), h)
    want = (h @ w) / np.sqrt((h * h).mean() + eps)
    np.testing.assert_allclose(np.asarray(out).sum(0), want, rtol=1e-4, atol=1e-4)

    wd = bf16(rng.randn(f, n) * 0.1)
    gu = rng.randn(2, 1, 2 * f).astype(np.float32)
    out = exp.gemv("swiglu", jnp.asarray(wd, jnp.bfloat16), parts=jnp.asarray(gu), half=f, splits=splits,
                   block_n=16, block_k=16)
    g, u = bf16(gu.sum(0)[:, :f]), bf16(gu.sum(0)[:, f:])
    act = bf16(g / (1 + np.exp(-g)) * u)
    np.testing.assert_allclose(np.asarray(out).sum(0), act @ wd, rtol=1e-3, atol=1e-3)
