"""Folded RMSNorm weights (an inference layout, runtime.fold_norms): the same logits as transformers at
TP 1/2/4/8, alone and with fused projections, the norms' weights no longer read, SPD generation unchanged,
LayerNorm models refused."""

import chex
import numpy as np
import pytest
from test_fused import compare_to_reference, spd_outputs_with_and_without

from spd_jax.config import ConfigError
from spd_jax.loading import load_params, open_model
from spd_jax.runtime import Engine, build_model_def, fold_norms, fuse_projections


def _compare(engine, params, ref_model, vocab, seed):
    compare_to_reference(engine, params, ref_model, vocab, seed, atol=3e-5)


@pytest.mark.parametrize("kind,tp,fuse", [("llama", 1, None), ("llama", 4, "after"), ("qwen2", 2, None),
                                          ("qwen2", 8, "before"), ("qwen3", 2, None), ("mistral", 4, None)])
def test_folded_logits_match_transformers(tiny_models, kind, tp, fuse):
    """qwen2: q/k/v biases (added after the 1/rms scale); qwen3: q/k norms; fused in either order."""
    path, ref_model = tiny_models[kind]
    lm = open_model(path)
    engine = Engine.create(build_model_def(lm.cfg, tp))
    params = load_params(engine, lm.source)
    if fuse == "before":
        engine, params = fuse_projections(engine, params)
    engine, params = fold_norms(engine, params)
    if fuse == "after":
        engine, params = fuse_projections(engine, params)
    assert engine.mdef.norms_folded and engine.mdef.fused == (fuse is not None)
    _compare(engine, params, ref_model, lm.cfg.vocab_size, tp)


def test_folded_weights_and_the_norm_weights_are_not_read(tiny_models):
    path, ref_model = tiny_models["llama"]
    lm = open_model(path)
    engine = Engine.create(build_model_def(lm.cfg, 2))
    params = load_params(engine, lm.source)
    g1 = np.asarray(params["layers"][0]["attn_norm"]["scale"], np.float32)
    g2 = np.asarray(params["layers"][0]["mlp_norm"]["scale"], np.float32)
    q, up = np.asarray(params["layers"][0]["attn"]["q"]["w"]), np.asarray(params["layers"][0]["mlp"]["up"]["w"])
    assert not np.allclose(g1, 1.0)  # the tiny models' norm weights are perturbed, so folding matters
    feng, fp = fold_norms(engine, params)
    chex.assert_trees_all_close(np.asarray(fp["layers"][0]["attn"]["q"]["w"]), g1[:, None] * q, rtol=1e-6)
    chex.assert_trees_all_close(np.asarray(fp["layers"][0]["mlp"]["up"]["w"]), g2[:, None] * up, rtol=1e-6)
    chex.assert_trees_all_equal(np.asarray(fp["layers"][0]["attn_norm"]["scale"]), np.ones_like(g1))
    # folded weights with unit norm weights would also be right if the norm ran in front of the projections;
    # the folded model must not read the block norms' weights at all: any value there leaves the logits alone
    fp["layers"] = {i: {**lp, "attn_norm": {"scale": lp["attn_norm"]["scale"] * 7.0},
                        "mlp_norm": {"scale": lp["mlp_norm"]["scale"] * 0.25}} for i, lp in fp["layers"].items()}
    _compare(feng, fp, ref_model, lm.cfg.vocab_size, 3)


def test_folded_spd_generation_equals_unfolded(tiny_models):
    out = spd_outputs_with_and_without(open_model(tiny_models["llama3"][0]), fold_norms, [[4, 9, 12, 3], [7, 7]])
    assert out[0] == out[2]
    chex.assert_trees_all_close(out[1], out[3], atol=3e-5, rtol=1e-4)


def test_fold_norms_refuses_layernorm_and_loading_into_a_folded_model(tiny_models):
    lm = open_model(tiny_models["opt"][0])
    engine = Engine.create(build_model_def(lm.cfg, 2))
    with pytest.raises(ConfigError, match="RMSNorm"):
        fold_norms(engine, load_params(engine, lm.source))
    llama = open_model(tiny_models["llama"][0])
    folded = Engine.create(build_model_def(llama.cfg, 1, norms_folded=True))
    with pytest.raises(Exception, match="unfolded"):
        load_params(folded, llama.source)


def test_generation_sessions_default_to_the_fast_layouts_evaluation_to_the_reference(tiny_models):
    """Unsaid layouts: generation (launch/infer.py) fuses and folds (fold only on RMSNorm families, so OPT is
    not refused), evaluation keeps the reference layout; an explicit --no-... wins; the session's RunConfig
    says what was applied (the embedded SmolLM2, a LLaMA-family RMSNorm model)."""
    from spd_jax.config import RunConfig
    from spd_jax.inference import open_session
    from spd_jax.runtime import layout_choice

    llama, opt = open_model(tiny_models["llama"][0]).cfg, open_model(tiny_models["opt"][0]).cfg
    assert layout_choice(llama, None, None, True) == (True, True)
    assert layout_choice(opt, None, None, True) == (True, False)
    assert layout_choice(llama, None, None, False) == (False, False)
    assert layout_choice(llama, False, None, True) == (False, True)
    assert layout_choice(llama, None, False, True) == (True, False)
    assert layout_choice(opt, None, True, True) == (True, True)  # asked for: fold_norms then refuses OPT
    for extra, default, want in [({}, True, (True, True)), ({}, False, (False, False)),
                                 ({"fused_projections": False}, True, (False, True)),
                                 ({"fold_norms": True}, False, (False, True))]:
        sess = open_session(RunConfig(model="embedded", tp=3, emulate=True, **extra), default_layout=default)
        assert (sess.engine.mdef.fused, sess.engine.mdef.norms_folded) == want, (extra, default)
        assert (sess.run.fused_projections, sess.run.fold_norms) == want
