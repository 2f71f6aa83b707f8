"""Our TP model (shard_map on simulated devices) vs transformers' PyTorch model on CPU."""

import chex
import numpy as np
import pytest
import torch

from spd_jax.loading import load_params, open_model
from spd_jax.runtime import Engine, build_model_def

KINDS = ("llama", "llama3", "qwen2", "opt", "qwen3", "mistral")


def _ref_logits(model, tokens, pad):
    b, t = tokens.shape
    mask = (np.arange(t)[None, :] >= pad[:, None]).astype(np.int64)
    kw = dict(attention_mask=torch.tensor(mask))
    if model.config.model_type != "opt":  # OPT derives positions from the mask itself
        kw["position_ids"] = torch.tensor(np.maximum(np.arange(t)[None, :] - pad[:, None], 0))
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), **kw).logits.numpy()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_logits_match_transformers(tiny_models, kind, tp):
    path, ref_model = tiny_models[kind]
    lm = open_model(path)
    engine = Engine.create(build_model_def(lm.cfg, tp))
    params = load_params(engine, lm.source)
    r = np.random.RandomState(tp)
    tokens = r.randint(3, lm.cfg.vocab_size, size=(3, 13)).astype(np.int32)
    pad = np.array([0, 4, 9], np.int32)  # left padding of different lengths
    ref = _ref_logits(ref_model, tokens, pad)
    ours = np.asarray(engine.logits(params, tokens, pad))
    chex.assert_shape(ours, ref.shape)
    for b in range(3):  # only real (non-pad) positions are defined
        chex.assert_trees_all_close(ours[b, pad[b]:], ref[b, pad[b]:], atol=2e-5, rtol=1e-4)


def test_kv_heads_replicated_when_tp_exceeds_them(tiny_models):
    lm = open_model(tiny_models["qwen2"][0])  # 2 kv heads
    mdef = build_model_def(lm.cfg, 8)
    assert mdef.layout.kv_heads == 8 and mdef.layout.kv_repeat == 4
    engine = Engine.create(mdef)
    params = load_params(engine, lm.source)
    k = np.asarray(params["layers"][0]["attn"]["k"]["w"])
    hd = lm.cfg.head_dim
    # devices 0..3 hold copies of kv head 0, devices 4..7 of kv head 1
    chex.assert_trees_all_equal(k[:, 0:hd], k[:, 3 * hd:4 * hd])
    assert not np.allclose(k[:, 0:hd], k[:, 4 * hd:5 * hd])
    # each device's shard holds exactly its slice, placed by NamedSharding
    shards = params["layers"][0]["attn"]["k"]["w"].addressable_shards
    assert len(shards) == 8 and all(s.data.shape == (lm.cfg.hidden, hd) for s in shards)
