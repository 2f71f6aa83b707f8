"""Fused q/k/v and gate/up projections (an inference layout): same logits as transformers and as the
unfused model, shard-major column layout, unfused buffers freed."""

import chex
import jax
import numpy as np
import pytest
from test_model_reference import _ref_logits

from spd_jax.config import GenerationConfig
from spd_jax.generate import Generator
from spd_jax.loading import load_params, open_model
from spd_jax.plan import SyncPlan
from spd_jax.runtime import Engine, build_model_def, fuse_projections


def compare_to_reference(engine, params, ref_model, vocab, seed, atol=2e-5):
    """Logits of a left-padded batch of two against transformers' model (the independent reference)."""
    tokens = np.random.RandomState(seed).randint(3, vocab, size=(2, 11)).astype(np.int32)
    pad = np.array([0, 5], np.int32)
    ref = _ref_logits(ref_model, tokens, pad)
    ours = np.asarray(engine.logits(params, tokens, pad))
    for b in range(2):
        chex.assert_trees_all_close(ours[b, pad[b]:], ref[b, pad[b]:], atol=atol, rtol=1e-4)


def spd_outputs_with_and_without(lm, transform, prompts):
    """Greedy SPD generation (blocks 0 and 2 dropped, TP 2 emulated) and prefill logits, from the loaded
    model and from transform(engine, params): [tokens, logits, tokens', logits']."""
    gen = GenerationConfig(max_new_tokens=7, stop_at_eos=False)
    plan = SyncPlan.from_flags((True, False, True)[: lm.cfg.n_layers] + (False,) * max(0, lm.cfg.n_layers - 3))
    out = []
    for apply in (False, True):
        eng = Engine.create(build_model_def(lm.cfg, 2), emulate=True)
        params = load_params(eng, lm.source)
        if apply:
            eng, params = transform(eng, params)
        out.append(Generator(eng, params, plan).generate(prompts, gen).tokens)
        toks = np.asarray([[4, 9, 12, 3, 8, 2]], np.int32)
        out.append(np.asarray(eng.logits(params, toks, np.zeros(1, np.int32), plan)))
    return out


@pytest.mark.parametrize("kind,tp", [("llama", 1), ("llama", 4), ("qwen2", 2), ("qwen2", 8), ("opt", 2)])
def test_fused_logits_match_transformers(tiny_models, kind, tp):
    path, ref_model = tiny_models[kind]
    lm = open_model(path)
    unfused = Engine.create(build_model_def(lm.cfg, tp))
    engine, params = fuse_projections(unfused, load_params(unfused, lm.source))
    assert engine.mdef.fused and "qkv" in params["layers"][0]["attn"]
    compare_to_reference(engine, params, ref_model, lm.cfg.vocab_size, tp)


def test_fused_layout_is_shard_major_and_unfused_buffers_are_freed(tiny_models):
    lm = open_model(tiny_models["llama"][0])  # GQA: 8 q heads, 4 kv heads
    eng = Engine.create(build_model_def(lm.cfg, 4))
    params = load_params(eng, lm.source)
    layer0 = params["layers"][0]
    q, k, v = (np.asarray(layer0["attn"][n]["w"]) for n in "qkv")
    gate, up = np.asarray(layer0["mlp"]["gate"]["w"]), np.asarray(layer0["mlp"]["up"]["w"])
    old = jax.tree.leaves(layer0)
    feng, fp = fuse_projections(eng, params)
    qkv = fp["layers"][0]["attn"]["qkv"]["w"]
    gu = fp["layers"][0]["mlp"]["gate_up"]["w"]
    split = lambda a: np.split(a, 4, axis=1)  # noqa: E731  (the 4 shards' column blocks)
    for i, (shard_qkv, shard_gu) in enumerate(zip(split(np.asarray(qkv)), split(np.asarray(gu)))):
        chex.assert_trees_all_equal(shard_qkv, np.concatenate([split(q)[i], split(k)[i], split(v)[i]], axis=1))
        chex.assert_trees_all_equal(shard_gu, np.concatenate([split(gate)[i], split(up)[i]], axis=1))
    assert all(s.data.shape == (lm.cfg.hidden, qkv.shape[1] // 4) for s in qkv.addressable_shards)
    assert all(x.is_deleted() for x in old)


def test_fused_generation_equals_unfused_with_spd(tiny_models):
    out = spd_outputs_with_and_without(open_model(tiny_models["llama3"][0]), fuse_projections, [[4, 9, 12, 3]])
    assert out[0] == out[2]
    chex.assert_trees_all_close(out[1], out[3], atol=3e-5, rtol=1e-4)
