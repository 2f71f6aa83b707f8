"""The Pallas decode-attention kernel (run by Pallas' interpreter here) against independent references:
a float64 NumPy attention, the model's full recompute, and the JAX attention path's generations."""

import dataclasses

import chex
import numpy as np
import pytest
from jaxpr_util import count_primitives

from spd_jax.config import GenerationConfig
from spd_jax.generate import Generator
from spd_jax.kernels import decode_attention, split_plan
from spd_jax.loading import load_params, open_model
from spd_jax.plan import SyncPlan
from spd_jax.runtime import Engine, build_model_def


@pytest.mark.parametrize("cache_len", [16, 48, 256, 272, 1024, 2176, 4096, 4112])
def test_split_plan_meets_the_kernels_shape_rules(cache_len):
    k_splits, block_k = split_plan(cache_len)
    chunk = cache_len // k_splits
    assert cache_len % k_splits == 0 and chunk % block_k == 0
    assert block_k in (16, 32, 64, 128)
    # the largest block the length allows (the loop inside a program is over blocks of this size)
    assert block_k == 128 or cache_len % (2 * block_k)
    # as close to 16 chunks as the block count allows
    n_blocks = cache_len // block_k
    assert all(abs(k_splits - 16) <= abs(k - 16) for k in range(1, n_blocks + 1) if n_blocks % k == 0)


@pytest.mark.parametrize("cache_len,plan", [(2176, (17, 128)), (4096, (16, 128)), (256, (2, 128)), (48, (3, 16))])
def test_split_plan_keeps_large_blocks_for_lengths_with_odd_factors(cache_len, plan):
    # 2 176 = 2 048 prompt + 128 new tokens: the old plan gave 8 chunks of 272 slots in 16-slot blocks
    assert split_plan(cache_len) == plan


def test_split_plan_refuses_other_lengths():
    with pytest.raises(ValueError, match="multiple of 16"):
        split_plan(40)


def _numpy_attention(q, k, v, start, end):
    """float64 masked softmax attention of one query position per sequence (GQA)."""
    b, t, h, d = q.shape
    kh = k.shape[2]
    out = np.zeros((b, t, h * d))
    for i in range(b):
        for hh in range(h):
            kk, vv = k[i, start[i]:end[i], hh // (h // kh)].astype(np.float64), \
                v[i, start[i]:end[i], hh // (h // kh)].astype(np.float64)
            s = kk @ q[i, 0, hh].astype(np.float64) / np.sqrt(d)
            p = np.exp(s - s.max())
            out[i, :, hh * d:(hh + 1) * d] = (p / p.sum()) @ vv
    return out


@pytest.mark.parametrize("t", [1, 2])
def test_decode_attention_equals_numpy_reference(t):
    import jax.numpy as jnp

    rng = np.random.RandomState(0)
    b, s, kh, g, d = 3, 64, 2, 3, 16
    q1 = rng.randn(b, 1, kh * g, d).astype(np.float32)
    q = np.repeat(q1, t, axis=1)  # T identical rows (the shadow row)
    k, v = rng.randn(b, s, kh, d).astype(np.float32), rng.randn(b, s, kh, d).astype(np.float32)
    start, end = np.array([0, 5, 17], np.int32), np.array([1, 40, 64], np.int32)
    out = np.asarray(decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(start),
                                      jnp.asarray(end)))
    chex.assert_shape(out, (b, t, kh * g * d))
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, start, end), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind,tp", [("llama", 2), ("mistral", 2), ("opt", 1)])
def test_kernel_generation_equals_jax_attention(tiny_models, kind, tp):
    """Greedy generations of a left-padded batch (and batch 1) are the same with the kernel as with the JAX
    attention path; Mistral's sliding window (4) is crossed many times by 20 new tokens."""
    lm = open_model(tiny_models[kind][0])
    eng = Engine.create(build_model_def(lm.cfg, tp))
    params = load_params(eng, lm.source)
    L = lm.cfg.n_layers
    g = Generator(eng, params, SyncPlan.from_flags((True,) + (False,) * (L - 1)))
    gen = GenerationConfig(max_new_tokens=20, stop_at_eos=False, decode_chunk=4)
    for prompts in ([[5, 17, 33, 8, 61]], [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 22, 23, 24, 25], [44]]):
        want = g.generate(prompts, gen).tokens
        got = g.generate(prompts, dataclasses.replace(gen, attention_kernel="pallas")).tokens
        assert got == want, (kind, prompts)


def test_kernel_cache_is_allocated_in_128_slot_multiples(tiny_models):
    """With the kernel the KV cache has a multiple of 128 slots, so `split_plan` keeps 128-slot blocks (the
    generations above then run on such a cache and equal the JAX path's on a 16-slot-rounded one)."""
    lm = open_model(tiny_models["llama"][0])
    eng = Engine.create(build_model_def(lm.cfg, 1))
    g = Generator(eng, load_params(eng, lm.source), SyncPlan.sync(lm.cfg.n_layers))
    gen = GenerationConfig(max_new_tokens=20)
    assert g._padded_lengths(5, gen) == (16, 48)
    assert g._padded_lengths(5, dataclasses.replace(gen, attention_kernel="pallas")) == (16, 128)
    assert split_plan(128) == (1, 128)


@pytest.mark.parametrize("shadow", [True, False])
def test_kernel_path_is_the_one_traced(tiny_models, shadow):
    """attention_kernel="pallas" puts one kernel call per block in a decode step (and none in prefill); "xla"
    none."""
    import jax
    import jax.numpy as jnp

    lm = open_model(tiny_models["llama"][0])
    eng = Engine.create(build_model_def(lm.cfg, 2))
    params = load_params(eng, lm.source)
    plan = SyncPlan.sync(lm.cfg.n_layers)
    pad = eng.replicate(np.zeros((1,), np.int32))
    step_args = (params, eng.replicate(np.array([[7]], np.int32)), pad, eng.init_cache(1, 32), jnp.int32(3))
    prefill_args = (params, eng.replicate(np.array([[7, 8, 9]], np.int32)), pad, eng.init_cache(1, 32), jnp.int32(0))

    def count(kernel, args, **kw):
        fwd = eng.forward(plan, with_cache=True, shadow_row=shadow, attention_kernel=kernel, **kw)
        return count_primitives(jax.make_jaxpr(fwd)(*args).jaxpr, "pallas_call")

    assert count("pallas", step_args, attend_cache=True) == lm.cfg.n_layers
    assert count("xla", step_args, attend_cache=True) == 0
    assert count("pallas", prefill_args) == 0


def test_generation_config_refuses_unknown_kernel():
    from spd_jax.config import ConfigError

    with pytest.raises(ConfigError, match="attention_kernel"):
        GenerationConfig(attention_kernel="triton").validate()
