"""The Pallas decode-attention kernel (run by Pallas' interpreter here) against independent references:
a float64 NumPy attention, the model's full recompute, and the JAX attention path's generations."""

import dataclasses

import chex
import numpy as np
import pytest
from jaxpr_util import count_primitives

from spd_jax.config import GenerationConfig
from spd_jax.generate import Generator
from spd_jax.kernels import decode_attention, decode_attention_append, split_plan
from spd_jax.loading import load_params, open_model
from spd_jax.plan import DecodePath, SyncPlan
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


@pytest.mark.parametrize("t,g,s,single_pass_max", [
    (1, 3, 64, None),   # one pass: the kernel normalises and writes the output itself
    (2, 3, 64, None),   # the shadow row's two identical query rows
    (1, 3, 256, 0),     # split into chunks (split_plan: 2 x 128 slots), combined in float32
    (1, 1, 272, 0),     # 17 chunks of one 16-slot block; MHA (one query head per kv head)
    (1, 20, 64, None),  # 20 query heads per kv head: two programs of 16 (masked) rows each
])
def test_decode_attention_equals_numpy_reference(t, g, s, single_pass_max):
    import jax.numpy as jnp

    rng = np.random.RandomState(0)
    b, kh, d = 3, 2, 16
    q1 = rng.randn(b, 1, kh * g, d).astype(np.float32)
    q = np.repeat(q1, t, axis=1)  # T identical rows (the shadow row)
    k, v = rng.randn(b, s, kh, d).astype(np.float32), rng.randn(b, s, kh, d).astype(np.float32)
    # a single slot, a range starting and ending inside blocks, the whole cache
    start, end = np.array([0, 5, 0], np.int32), np.array([1, s - 23, s], np.int32)
    out = np.asarray(decode_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(start),
                                      jnp.asarray(end), single_pass_max=single_pass_max))
    chex.assert_shape(out, (b, t, kh * g * d))
    np.testing.assert_allclose(out, _numpy_attention(q, k, v, start, end), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("t,g,s,slot,single_pass_max", [
    (1, 3, 64, 40, None),   # one pass
    (2, 3, 256, 200, 0),    # split into two chunks; the new slot in the second
    (1, 1, 256, 100, 0),    # the new slot in the first of two chunks (the second attends nothing)
    (1, 20, 64, 63, None),  # two programs of query heads; the last slot of the cache
    (1, 2, 64, 0, None),    # the first token: only the new slot is attended
])
def test_append_kernel_writes_the_cache_and_equals_numpy_reference(t, g, s, slot, single_pass_max):
    """The decode path's kernel: attends over [start, slot) of the old cache plus this step's k/v, and returns
    the cache with k/v written into `slot` (equal, bit for bit, to writing row 0 of the step there)."""
    import jax.numpy as jnp

    rng = np.random.RandomState(2)
    b, kh, d = 3, 2, 16
    q = np.repeat(rng.randn(b, 1, kh * g, d).astype(np.float32), t, axis=1)
    k_new = np.repeat(rng.randn(b, 1, kh, d).astype(np.float32), t, axis=1)
    v_new = np.repeat(rng.randn(b, 1, kh, d).astype(np.float32), t, axis=1)
    k, v = rng.randn(b, s, kh, d).astype(np.float32), rng.randn(b, s, kh, d).astype(np.float32)
    start = np.minimum(np.array([0, 5, slot], np.int32), slot)  # the last sequence attends its new slot only
    out, k2, v2 = decode_attention_append(*(jnp.asarray(a) for a in (q, k_new, v_new, k, v, start)), jnp.int32(slot),
                                          single_pass_max=single_pass_max)
    k_want, v_want = k.copy(), v.copy()
    k_want[:, slot], v_want[:, slot] = k_new[:, 0], v_new[:, 0]
    np.testing.assert_array_equal(np.asarray(k2), k_want)
    np.testing.assert_array_equal(np.asarray(v2), v_want)
    chex.assert_shape(out, (b, t, kh * g * d))
    np.testing.assert_allclose(np.asarray(out), _numpy_attention(q, k_want, v_want, start, np.full(b, slot + 1)),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("s,kh,g,single_pass_max", [(256, 32, 1, None), (256, 8, 8, 0), (2176, 4, 20, None)])
def test_gpu_kernel_lowers_to_one_triton_call(s, kh, g, single_pass_max):
    """The GPU path (masked loads and stores, which Pallas' interpreter above does not run) lowers through
    Pallas' Triton backend for CUDA, one kernel per call, for LLaMA-2-7B / 70B-like heads in both plans.
    Lowering is what a CPU can check; the kernel's numbers on a GPU are in docs/performance.md."""
    import functools

    import jax
    import jax.numpy as jnp

    bf = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.bfloat16)  # noqa: E731
    i32 = jax.ShapeDtypeStruct((1,), jnp.int32)
    triton = "__gpu$xla.gpu.triton"

    def lower(fn, *args):
        return jax.export.export(jax.jit(fn), platforms=["cuda"],
                                 disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(triton)])(*args).mlir_module()

    text = lower(functools.partial(decode_attention, interpret=False, single_pass_max=single_pass_max),
                 bf(1, 2, kh * g, 128), bf(1, s, kh, 128), bf(1, s, kh, 128), i32, i32)
    assert text.count(f"custom_call @{triton}") == 1 and "spd_decode_attention" in text
    # the decode path's kernel, which also writes the step's k/v into the (aliased) cache
    text = lower(functools.partial(decode_attention_append, interpret=False, single_pass_max=single_pass_max),
                 bf(1, 2, kh * g, 128), bf(1, 2, kh, 128), bf(1, 2, kh, 128), bf(1, s, kh, 128), bf(1, s, kh, 128),
                 i32, jax.ShapeDtypeStruct((), jnp.int32))
    assert text.count(f"custom_call @{triton}") == 1 and "spd_decode_attention_append" in text
    assert "output_operand_aliases" in text  # the caches are updated in place


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
        fwd = eng.forward(plan, with_cache=True, path=DecodePath(kernel, shadow), **kw)
        return count_primitives(jax.make_jaxpr(fwd)(*args).jaxpr, "pallas_call")

    assert count("pallas", step_args, attend_cache=True) == lm.cfg.n_layers
    assert count("xla", step_args, attend_cache=True) == 0
    assert count("pallas", prefill_args) == 0


def test_generation_config_refuses_unknown_kernel():
    from spd_jax.config import ConfigError

    with pytest.raises(ConfigError, match="attention_kernel"):
        GenerationConfig(attention_kernel="triton").validate()


def test_auto_picks_the_kernel_on_cuda_gpus_where_it_applies():
    from spd_jax.kernels import choose_attention_kernel, resolve_attention_kernel

    assert choose_attention_kernel("auto", 128, "gpu", "9.0") == "pallas"  # H100 / H200
    assert choose_attention_kernel("auto", 64, "gpu", "8.0") == "pallas"   # A100
    assert choose_attention_kernel("auto", 128, "gpu", "7.0") == "xla"     # V100: no bf16 Triton dot
    assert choose_attention_kernel("auto", 128, "gpu", "gfx90a") == "xla"  # ROCm
    assert choose_attention_kernel("auto", 80, "gpu", "9.0") == "xla"      # head_dim not a power of two
    assert choose_attention_kernel("auto", 128, "cpu", None) == "xla"
    assert choose_attention_kernel("xla", 128, "gpu", "9.0") == "xla"
    assert choose_attention_kernel("pallas", 128, "cpu", None) == "pallas"  # Pallas' interpreter (tests)
    with pytest.raises(ValueError, match="power-of-two head dimension"):
        choose_attention_kernel("pallas", 96, "gpu", "9.0")
    with pytest.raises(ValueError, match="attention_kernel"):
        choose_attention_kernel("triton", 128, "gpu", "9.0")
    assert resolve_attention_kernel("auto", 128) == "xla"  # this CPU


def test_generation_default_is_auto_and_resolves_per_device(tiny_models):
    lm = open_model(tiny_models["llama"][0])
    eng = Engine.create(build_model_def(lm.cfg, 1))
    g = Generator(eng, load_params(eng, lm.source), SyncPlan.sync(lm.cfg.n_layers))
    assert GenerationConfig().attention_kernel == "auto"
    assert g.attention_kernel(GenerationConfig()) == "xla"  # on this CPU
    assert g.attention_kernel(GenerationConfig(attention_kernel="pallas")) == "pallas"


def test_kernel_settings_change_the_plan_not_the_result():
    """The kernel's Triton settings (a run's `attention_tune`, carried by the DecodePath) set block size and
    plan; a bad setting is refused, at load for a config string and at trace time for an argument."""
    import jax.numpy as jnp

    from spd_jax.config import ConfigError, parse_kernel_tune

    rng = np.random.RandomState(1)
    q = rng.randn(1, 1, 2, 16).astype(np.float32)
    k, v = rng.randn(1, 256, 2, 16).astype(np.float32), rng.randn(1, 256, 2, 16).astype(np.float32)
    start, end = np.array([3], np.int32), np.array([200], np.int32)
    want = _numpy_attention(q, k, v, start, end)
    args = [jnp.asarray(a) for a in (q, k, v, start, end)]
    split = dict(parse_kernel_tune("block_k=32,single_pass_max=0"))  # split: 2 chunks of 128 slots
    assert split == {"block_k": 32, "single_pass_max": 0}
    np.testing.assert_allclose(np.asarray(decode_attention(*args, **split)), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(decode_attention(*args, block_k=16, single_pass_max=0)), want,
                               atol=1e-5, rtol=1e-5)
    one_pass = dict(parse_kernel_tune("block_k=32"))  # one pass over 256 slots in 32-slot blocks
    np.testing.assert_allclose(np.asarray(decode_attention(*args, **one_pass)), want, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="block_k must be a power of two"):
        decode_attention(*args, block_k=48)
    for bad in ("warps=8", "block_k=x", "block_k"):
        with pytest.raises(ConfigError, match="attention_tune"):
            GenerationConfig(attention_tune=bad).validate()


def test_no_environment_variable_changes_the_traced_decode(tiny_models, monkeypatch):
    """The decode path is a value: variables that once changed the traced step do nothing now."""
    import jax
    import jax.numpy as jnp

    lm = open_model(tiny_models["llama"][0])
    eng = Engine.create(build_model_def(lm.cfg, 2))
    params = load_params(eng, lm.source)
    plan = SyncPlan.sync(lm.cfg.n_layers)
    args = (params, eng.replicate(np.array([[7]], np.int32)), eng.replicate(np.zeros((1,), np.int32)),
            eng.init_cache(1, 128), jnp.int32(3))
    fwd = eng.forward(plan, attend_cache=True, with_cache=True, path=DecodePath("pallas", True))
    before = str(jax.make_jaxpr(fwd)(*args))
    monkeypatch.setenv("SPD_JAX_ATTENTION_TUNE", "block_k=16,single_pass_max=0")
    monkeypatch.setenv("SPD_JAX_SHADOW_ALLREDUCE", "both")
    assert str(jax.make_jaxpr(fwd)(*args)) == before
    # the same settings as values do change it
    tuned = eng.forward(plan, attend_cache=True, with_cache=True,
                        path=DecodePath("pallas", True, "both", (("block_k", 16), ("single_pass_max", 0))))
    assert str(jax.make_jaxpr(tuned)(*args)) != before


@pytest.mark.parametrize("tp", [2, 4])
def test_the_default_gpu_decode_path_generates_what_the_reference_path_does(tiny_models, tp):
    """The decode path `auto` gives on CUDA GPUs (fused projections + folded norms + the cache-writing kernel)
    against the plain layout with XLA's attention: the same greedy tokens for a padded batch, SPD on half the
    blocks (float32, so folding's rounding is far below the logit gaps)."""
    from spd_jax.runtime import fold_norms, fuse_projections

    lm = open_model(tiny_models["llama"][0])
    L = lm.cfg.n_layers
    plan = SyncPlan.from_flags(tuple(i % 2 == 0 for i in range(L)))
    gen = GenerationConfig(max_new_tokens=12, stop_at_eos=False, decode_chunk=4)
    prompts = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 22, 23]]
    eng = Engine.create(build_model_def(lm.cfg, tp))
    want = Generator(eng, load_params(eng, lm.source), plan).generate(prompts, dataclasses.replace(
        gen, attention_kernel="xla")).tokens
    feng, fparams = fuse_projections(eng, load_params(eng, lm.source))
    feng, fparams = fold_norms(feng, fparams)
    assert feng.mdef.fused and feng.mdef.norms_folded
    got = Generator(feng, fparams, plan).generate(prompts, dataclasses.replace(gen, attention_kernel="pallas")).tokens
    assert got == want
