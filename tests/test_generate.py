"""Generation: KV-cache decode vs full recompute, determinism, seeds, padding, EOS, context limit."""

import dataclasses

import chex
import numpy as np
import pytest
from jaxpr_util import allreduce_rows, count_primitives

from spd_jax.config import GenerationConfig
from spd_jax.config import ContextLengthError
from spd_jax.generate import Generator
from spd_jax.loading import load_params, open_model
from spd_jax.plan import DecodePath, SyncPlan
from spd_jax.runtime import Engine, build_model_def


@pytest.fixture(scope="module")
def tiny(tiny_models):
    lm = open_model(tiny_models["llama"][0])
    eng = Engine.create(build_model_def(lm.cfg, 2))
    return lm, eng, load_params(eng, lm.source)


def _recompute_greedy(eng, params, prompt, n, modes):
    seq = list(prompt)
    for _ in range(n):
        logits = np.asarray(eng.logits(params, np.array([seq]), plan=SyncPlan.from_flags(modes)))
        seq.append(int(logits[0, -1].argmax()))
    return seq[len(prompt):]


@pytest.mark.parametrize("shadow_row", [True, False])
@pytest.mark.parametrize("modes", [(False, False, False), (True, False, True)])
def test_kv_cache_decode_equals_full_recompute(tiny, modes, shadow_row):
    lm, eng, params = tiny
    gen = GenerationConfig(max_new_tokens=8, stop_at_eos=False, shadow_row=shadow_row)
    prompt = [5, 17, 33, 8, 61]
    out = Generator(eng, params, SyncPlan.from_flags(modes)).generate([prompt], gen)
    assert out.tokens[0] == _recompute_greedy(eng, params, prompt, 8, modes)
    assert out.decode_tokens == 7 and out.ttft_s > 0 and out.decode_s > 0


def test_greedy_is_deterministic_and_padding_does_not_change_tokens(tiny):
    lm, eng, params = tiny
    g = Generator(eng, params, SyncPlan.from_flags((True, True, False)))
    gen = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    prompts = [[5, 17, 33], [9, 8, 7, 6, 5, 4, 3, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31], [44]]
    batch = g.generate(prompts, gen)
    assert batch.tokens == g.generate(prompts, gen).tokens
    for p, toks in zip(prompts, batch.tokens):
        assert g.generate([p], gen).tokens[0] == toks


def test_sampling_reproducible_by_seed(tiny):
    lm, eng, params = tiny
    g = Generator(eng, params, SyncPlan.from_flags((False,) * 3))
    gen = GenerationConfig(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.95, seed=7, stop_at_eos=False)
    a = g.generate([[5, 6, 7]], gen).tokens
    assert a == g.generate([[5, 6, 7]], gen).tokens
    assert a != g.generate([[5, 6, 7]], dataclasses.replace(gen, seed=8)).tokens


@pytest.mark.parametrize("kw", [dict(top_k=1), dict(top_p=1e-6)])
def test_top_k_1_and_tiny_top_p_reduce_to_greedy(tiny, kw):
    lm, eng, params = tiny
    g = Generator(eng, params, SyncPlan.from_flags((False,) * 3))
    greedy = g.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=6, stop_at_eos=False)).tokens
    sampled = g.generate([[5, 6, 7]], GenerationConfig(max_new_tokens=6, temperature=1.5, seed=3,
                                                       stop_at_eos=False, **kw)).tokens
    assert sampled == greedy


def test_sample_tokens_top_p_keeps_the_nucleus():
    import jax

    from spd_jax.generate import sample_tokens

    logits = np.log(np.array([[0.5, 0.3, 0.15, 0.05]], np.float32))
    draws = {int(sample_tokens(logits, jax.random.PRNGKey(s), temperature=1.0, top_k=0, top_p=0.7)[0])
             for s in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 >= 0.7: tokens 2 and 3 are never drawn


def test_stops_at_eos(tiny):
    lm, eng, params = tiny
    g = Generator(eng, params, SyncPlan.from_flags((False,) * 3))
    free = g.generate([[5, 17, 33]], GenerationConfig(max_new_tokens=8, stop_at_eos=False)).tokens[0]
    eos = free[3]
    g.cfg = dataclasses.replace(lm.cfg, eos_token_ids=(eos,))
    out = g.generate([[5, 17, 33], [5, 17, 33]], GenerationConfig(max_new_tokens=8))
    assert out.tokens[0] == free[: free.index(eos)] and out.finished == [True, True]


def test_prompt_longer_than_context_is_a_clear_error(tiny):
    lm, eng, params = tiny
    g = Generator(eng, params, SyncPlan.from_flags((False,) * 3))
    with pytest.raises(ContextLengthError, match="exceeds the model's context of 128 tokens"):
        g.generate([[5] * 120], GenerationConfig(max_new_tokens=20))


def test_emulated_generation_matches_real_tp(tiny_models):
    lm = open_model(tiny_models["opt"][0])
    gen = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    out = []
    for emulate in (False, True):
        eng = Engine.create(build_model_def(lm.cfg, 4), emulate=emulate)
        out.append(Generator(eng, load_params(eng, lm.source), SyncPlan.from_flags((True, False, True))).generate([[4, 9, 12]], gen).tokens)
    chex.assert_equal(out[0], out[1])


@pytest.mark.parametrize("chunk", [1, 3, 8, 64])
def test_decode_chunk_gives_the_same_tokens_and_counts(tiny, chunk):
    """Chunked decode (stop condition checked every `chunk` steps) == the full-recompute reference, with and
    without an EOS inside a chunk, including a remainder chunk (10 new tokens = 9 decode steps)."""
    lm, eng, params = tiny
    g = Generator(eng, params, SyncPlan.from_flags((True, False, False)))
    prompt = [5, 17, 33, 2]
    ref = _recompute_greedy(eng, params, prompt, 10, (True, False, False))
    out = g.generate([prompt], GenerationConfig(max_new_tokens=10, stop_at_eos=False, decode_chunk=chunk))
    assert out.tokens[0] == ref and out.decode_tokens == 9
    eos = ref[5]
    g.cfg = dataclasses.replace(lm.cfg, eos_token_ids=(eos,))
    out = g.generate([prompt, [44, 45]], GenerationConfig(max_new_tokens=10, decode_chunk=chunk))
    cut = ref.index(eos)
    assert out.tokens[0] == ref[:cut] and out.finished[0]
    other = _recompute_greedy(eng, params, [44, 45], 10, (True, False, False))
    assert out.tokens[1] == (other[: other.index(eos)] if eos in other else other)
    assert out.finished[1] == (eos in other)


def test_decode_chunk_must_be_positive(tiny):
    from spd_jax.config import ConfigError

    lm, eng, params = tiny
    with pytest.raises(ConfigError, match="decode_chunk must be >= 1"):
        Generator(eng, params, SyncPlan.from_flags((False,) * 3)).generate([[5]], GenerationConfig(decode_chunk=0))


@pytest.mark.parametrize("emulate", [False, True])
def test_precompile_in_threads_then_generate_uses_it_and_matches(tiny_models, emulate):
    """Ahead-of-time compilation (several generators in parallel threads, as the benchmark does) gives the
    same tokens as the lazily jitted path, and generate() really runs the precompiled executables."""
    from concurrent.futures import ThreadPoolExecutor

    lm = open_model(tiny_models["llama"][0])
    eng = Engine.create(build_model_def(lm.cfg, 2), emulate=emulate)
    params = load_params(eng, lm.source)
    gen = GenerationConfig(max_new_tokens=9, stop_at_eos=False, decode_chunk=4)
    prompt = [[5, 17, 33, 8, 61, 2, 9]]
    modes = [(False,) * 3, (True, True, True), (True, False, True)]
    ref = [Generator(eng, params, SyncPlan.from_flags(m)).generate(prompt, gen).tokens for m in modes]
    gens = [Generator(eng, params, SyncPlan.from_flags(m)) for m in modes]
    with ThreadPoolExecutor(3) as ex:
        list(ex.map(lambda g: g.precompile(gen, len(prompt[0])), gens))

    def no_jit(*a, **k):
        raise AssertionError("the precompiled executable was not used")

    for g, r in zip(gens, ref):
        g._prefill_fn = g._decode_fn = no_jit
        assert g.generate(prompt, gen).tokens == r


# ----------------------------------------------------------------------------- attention over the filled cache


@pytest.mark.parametrize("t_pad,max_new,first", [(16, 40, 4), (16, 40, 8), (128, 128, 256), (16, 1024, 256),
                                                 (2048, 128, 256), (48, 200, 16), (16, 2, 8), (16, 9, 0)])
def test_attention_windows_cover_each_step_with_at_most_twice_its_context(t_pad, max_new, first):
    from spd_jax.generate import _round_up, attention_windows

    max_len = _round_up(t_pad + max_new, 16)
    wins = attention_windows(t_pad, max_new, max_len, first)
    steps = [i for lo, hi, _ in wins for i in range(lo, hi)]
    assert steps == list(range(1, max_new))  # every decode step once, in order
    for lo, hi, w in wins:
        assert w <= max_len
        for i in range(lo, hi):
            need = t_pad + i  # step i attends over slots 0 .. t_pad + i - 1
            assert need <= w
            assert first == 0 or w == max_len or w <= max(first, 2 * need - 2)
    if first == 0:
        assert [w for *_, w in wins] == [max_len]


@pytest.mark.parametrize("tp,spd,shadow,kernel", [
    (1, False, True, "xla"), (2, True, True, "xla"), (4, False, True, "xla"), (4, True, True, "xla"),
    (2, False, False, "xla"), (4, True, False, "xla"),
    (1, False, True, "pallas"), (2, True, True, "pallas"), (4, False, False, "pallas"), (4, True, True, "pallas")])
def test_decode_attention_over_the_filled_part_equals_full_recompute(tiny_models, tp, spd, shadow, kernel):
    """A decode step that attends over only the first w cache slots (w >= the filled part) gives the logits of
    a full recompute of the sequence, at several fill levels, in sync and SPD modes, with and without the
    shadow row, with the JAX attention and the Pallas kernel (which reads the filled slots of the whole
    cache whatever w); the cache the step wrote gives the next step the recompute's logits too."""
    import jax
    import jax.numpy as jnp

    lm = open_model(tiny_models["llama"][0])
    eng = Engine.create(build_model_def(lm.cfg, tp))
    params = load_params(eng, lm.source)
    L = lm.cfg.n_layers
    plan = SyncPlan.all_spd(L) if spd else SyncPlan.sync(L)
    seq = np.random.RandomState(tp).randint(3, 100, size=(1, 41)).astype(np.int32)
    ref = np.asarray(eng.logits(params, seq, plan=plan))
    pad = eng.replicate(np.zeros((1,), np.int32))
    prefill = jax.jit(eng.forward(plan, with_cache=True))
    for n in (1, 9, 23, 39):  # filled slots before the step
        _, cache = prefill(params, eng.replicate(seq[:, :n]), pad, eng.init_cache(1, 64), jnp.int32(0))
        # exactly the filled part, a window, the whole cache (the kernel reads the filled slots whatever w)
        for w in (n + 1, 32 if n < 32 else 48, True) if kernel == "xla" else (True,):
            step = jax.jit(eng.forward(plan, attend_cache=w, with_cache=True, path=DecodePath(kernel, shadow)))
            logits, cache2 = step(params, eng.replicate(seq[:, n:n + 1]), pad, cache, jnp.int32(n))
            chex.assert_shape(logits, (1, 1, lm.cfg.vocab_size))
            np.testing.assert_allclose(np.asarray(logits)[0, 0], ref[0, n], atol=2e-5, rtol=2e-5,
                                       err_msg=f"fill {n}, window {w}")
        nxt = jax.jit(eng.forward(plan, attend_cache=True, with_cache=True, path=DecodePath(kernel, shadow)))
        logits, _ = nxt(params, eng.replicate(seq[:, n + 1:n + 2]), pad, cache2, jnp.int32(n + 1))
        np.testing.assert_allclose(np.asarray(logits)[0, 0], ref[0, n + 1], atol=2e-5, rtol=2e-5,
                                   err_msg=f"step after fill {n}")


def test_shadow_row_decode_step_has_no_row_padding(tiny):
    """With the shadow row a batch-1 decode step pads no product to two rows: the seven per-block
    concatenations of `matmul`'s single-row path (q, k, v, o, gate, up, down) are gone, the LM head's too."""
    import jax
    import jax.numpy as jnp

    lm, eng, params = tiny
    plan = SyncPlan.sync(lm.cfg.n_layers)
    args = (params, eng.replicate(np.array([[7]], np.int32)), eng.replicate(np.zeros((1,), np.int32)),
            eng.init_cache(1, 16), jnp.int32(3))
    counts = {s: count_primitives(jax.make_jaxpr(eng.forward(plan, attend_cache=True, with_cache=True,
                                                              path=DecodePath(shadow_row=s)))(*args).jaxpr,
                                  "concatenate")
              for s in (False, True)}
    assert counts[False] - counts[True] == 7 * lm.cfg.n_layers + 1, counts


@pytest.mark.parametrize("tp", [2, 4])
def test_shadow_row_all_reduces_carry_one_row(tiny_models, tp):
    """The shadow row's all-reduces send one row (the message of one-row decode), both with the path's
    shadow_allreduce "both"; the logits are those of one-row decode either way (sync and SPD)."""
    import jax
    import jax.numpy as jnp

    lm = open_model(tiny_models["llama"][0])
    eng = Engine.create(build_model_def(lm.cfg, tp))
    params = load_params(eng, lm.source)
    L = lm.cfg.n_layers
    seq = np.random.RandomState(0).randint(3, 100, size=(1, 6)).astype(np.int32)
    pad = eng.replicate(np.zeros((1,), np.int32))
    for plan in (SyncPlan.sync(L), SyncPlan.from_flags((True, False, True))):
        _, cache = jax.jit(eng.forward(plan, with_cache=True))(params, eng.replicate(seq[:, :5]), pad,
                                                               eng.init_cache(1, 16), jnp.int32(0))
        args = (params, eng.replicate(seq[:, 5:6]), pad, cache, jnp.int32(5))
        n_ar = 1 + sum(1 if m == "spd" else 2 for m in plan.modes)
        out = {}
        for mode, shadow in (("first", True), ("both", True), ("first", False)):
            fwd = eng.forward(plan, attend_cache=True, with_cache=True,
                              path=DecodePath(shadow_row=shadow, shadow_allreduce=mode))
            rows = allreduce_rows(jax.make_jaxpr(fwd)(*args).jaxpr)
            assert len(rows) == n_ar, rows
            assert rows == ([1] * n_ar if mode == "first" or not shadow else [1] + [2] * (n_ar - 1)), (mode, rows)
            out[mode, shadow] = np.asarray(jax.jit(fwd)(*args)[0])
        ref = out["first", False]
        for k, v in out.items():
            np.testing.assert_allclose(v, ref, atol=2e-5, rtol=2e-5, err_msg=str(k))


@pytest.mark.parametrize("window", [4, 8])
def test_generation_with_attention_windows_equals_whole_cache_and_recompute(tiny, window):
    """40 new tokens after a 5-token prompt cross several windows (16, 32, 64 slots): the tokens equal those
    of decode over the whole cache and are the greedy choices of a full recompute of the final sequence."""
    lm, eng, params = tiny
    plan = SyncPlan.from_flags((True, False, True))
    g = Generator(eng, params, plan)
    prompt = [5, 17, 33, 8, 61]
    gen = GenerationConfig(max_new_tokens=40, stop_at_eos=False, decode_chunk=3)
    whole = g.generate([prompt], dataclasses.replace(gen, attend_window=0)).tokens[0]
    out = g.generate([prompt], dataclasses.replace(gen, attend_window=window))
    assert out.tokens[0] == whole and out.decode_tokens == 39
    seq = np.array([prompt + whole])
    greedy = np.asarray(eng.logits(params, seq, plan=plan))[0].argmax(-1)
    assert list(greedy[len(prompt) - 1:-1]) == whole
