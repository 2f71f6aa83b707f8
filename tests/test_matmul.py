"""model.matmul: the batch-1 product is lowered as a two-row GEMM (see its docstring) and is still x @ w."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spd_jax.model import matmul


def _dot_lhs_shapes(fn, *args):
    jaxpr = jax.make_jaxpr(fn)(*args)
    return [tuple(e.invars[0].aval.shape) for e in jaxpr.eqns if e.primitive.name == "dot_general"]


@pytest.mark.parametrize("lead", [(1,), (1, 1), (2, 1), (1, 3), (4, 5)])
def test_matmul_equals_float64_reference(lead):
    rng = np.random.RandomState(0)
    x = rng.randn(*lead, 48).astype(np.float32)
    w = rng.randn(48, 40).astype(np.float32)
    y = np.asarray(jax.jit(matmul)(jnp.asarray(x), jnp.asarray(w)))
    ref = x.astype(np.float64) @ w.astype(np.float64)
    assert y.shape == ref.shape
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


def test_single_row_is_a_two_row_dot_and_larger_inputs_are_unchanged():
    w = jnp.ones((64, 32), jnp.bfloat16)
    assert _dot_lhs_shapes(matmul, jnp.ones((1, 1, 64), jnp.bfloat16), w) == [(2, 64)]
    assert _dot_lhs_shapes(matmul, jnp.ones((2, 1, 64), jnp.bfloat16), w) == [(2, 1, 64)]
    assert _dot_lhs_shapes(matmul, jnp.ones((1, 7, 64), jnp.bfloat16), w) == [(1, 7, 64)]


def test_preferred_element_type_is_kept():
    y = matmul(jnp.ones((1, 1, 8), jnp.bfloat16), jnp.ones((8, 4), jnp.bfloat16), preferred_element_type=jnp.float32)
    assert y.dtype == jnp.float32 and y.shape == (1, 1, 4)
