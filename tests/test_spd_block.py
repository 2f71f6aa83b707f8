"""The SPD block: real TP == single-device emulation; tp=1 SPD == sync; SPD equations vs NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spd_jax.loading import load_params, open_model
from spd_jax.plan import SyncPlan
from spd_jax.runtime import Engine, build_model_def

MODES = {
    "sync": (False, False, False),
    "spd": (True, True, True),
    "mixed": (False, True, True),
}


def _engine(path, tp, emulate):
    lm = open_model(path)
    eng = Engine.create(build_model_def(lm.cfg, tp), emulate=emulate)
    return lm, eng, load_params(eng, lm.source)


@pytest.mark.parametrize("kind", ["llama", "opt"])
@pytest.mark.parametrize("tp", [2, 4, 8])
def test_shard_map_equals_emulation(tiny_models, kind, tp):
    path = tiny_models[kind][0]
    _, real, p_real = _engine(path, tp, emulate=False)
    _, emu, p_emu = _engine(path, tp, emulate=True)
    tokens = np.random.RandomState(1).randint(3, 90, size=(2, 9))
    for name, modes in MODES.items():
        a = np.asarray(real.logits(p_real, tokens, plan=SyncPlan.from_flags(modes)))
        b = np.asarray(emu.logits(p_emu, tokens, plan=SyncPlan.from_flags(modes)))
        chex.assert_trees_all_close(a, b, atol=1e-5, rtol=1e-5, custom_message=f"{kind} tp={tp} {name}")


def test_emulation_param_roundtrip():
    x = np.arange(4 * 6, dtype=np.float32).reshape(4, 6)
    from jax.sharding import PartitionSpec as P

    from spd_jax.runtime import stack_shards, unstack_shards

    for spec in (P(None, "tp"), P("tp", None), P()):
        st = stack_shards(jnp.asarray(x), spec, 2)
        chex.assert_trees_all_equal(np.asarray(unstack_shards(st, spec)), x)
    st = stack_shards(jnp.asarray(x), P(None, "tp"), 2)
    chex.assert_trees_all_equal(np.asarray(st[1]), x[:, 3:])  # shard 1 = columns 3..5


@pytest.mark.parametrize("kind", ["llama", "qwen2", "opt"])
def test_spd_at_tp1_equals_sync(tiny_models, kind):
    _, eng, params = _engine(tiny_models[kind][0], 1, emulate=False)
    tokens = np.random.RandomState(2).randint(3, 90, size=(2, 10))
    sync = np.asarray(eng.logits(params, tokens, plan=SyncPlan.from_flags(MODES["sync"])))
    spd = np.asarray(eng.logits(params, tokens, plan=SyncPlan.from_flags(MODES["spd"])))
    chex.assert_trees_all_close(spd, sync, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_spd_at_tp2_really_drops_the_sync(tiny_models, kind):
    _, eng, params = _engine(tiny_models[kind][0], 2, emulate=False)
    tokens = np.random.RandomState(2).randint(3, 90, size=(2, 10))
    sync = np.asarray(eng.logits(params, tokens, plan=SyncPlan.from_flags(MODES["sync"])))
    spd = np.asarray(eng.logits(params, tokens, plan=SyncPlan.from_flags(MODES["spd"])))
    assert np.abs(spd - sync).max() > 1e-3


# ----------------------------------------------------------------------------- independent NumPy SPD block


def _sd(model):
    return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _ln(x, w, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * w + b


def _rope(x_thd, theta):
    t, _, d = x_thd.shape
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    f = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([f, f], -1))[:, None], np.sin(np.concatenate([f, f], -1))[:, None]
    rot = np.concatenate([-x_thd[..., d // 2:], x_thd[..., : d // 2]], -1)
    return x_thd * cos + rot * sin


def _attn_heads(q_thd, k_thd, v_thd):
    """Causal attention per head (k/v already expanded to q's heads). Returns [T, H*hd]."""
    t, h, d = q_thd.shape
    s = np.einsum("thd,shd->hts", q_thd, k_thd) / np.sqrt(d)
    s = np.where(np.tril(np.ones((t, t), bool))[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v_thd).reshape(t, h * d)


def _numpy_spd_block(sd, cfg, x_td, tp, pre, opt):
    """The SPD block equations (docs/design.md), evaluated shard by shard on the HF weights."""
    h_n, kv_n = cfg.num_attention_heads, getattr(cfg, "num_key_value_heads", cfg.num_attention_heads)
    hd = cfg.hidden_size // h_n
    w = lambda n: sd[f"{pre}.{n}"]  # noqa: E731
    if opt:
        h = _ln(x_td, w("self_attn_layer_norm.weight"), w("self_attn_layer_norm.bias"))
        q = (h @ w("self_attn.q_proj.weight").T + w("self_attn.q_proj.bias")).reshape(-1, h_n, hd)
        k = (h @ w("self_attn.k_proj.weight").T + w("self_attn.k_proj.bias")).reshape(-1, kv_n, hd)
        v = (h @ w("self_attn.v_proj.weight").T + w("self_attn.v_proj.bias")).reshape(-1, kv_n, hd)
        wo, b_o = w("self_attn.out_proj.weight"), w("self_attn.out_proj.bias")
    else:
        eps = cfg.rms_norm_eps
        h = _rms(x_td, w("input_layernorm.weight"), eps)
        theta = cfg.rope_parameters["rope_theta"]
        q = _rope((h @ w("self_attn.q_proj.weight").T).reshape(-1, h_n, hd), theta)
        k = _rope((h @ w("self_attn.k_proj.weight").T).reshape(-1, kv_n, hd), theta)
        v = (h @ w("self_attn.v_proj.weight").T).reshape(-1, kv_n, hd)
        wo, b_o = w("self_attn.o_proj.weight"), 0.0
    grp = h_n // kv_n
    k, v = np.repeat(k, grp, axis=1), np.repeat(v, grp, axis=1)
    hpd = h_n // tp
    ys, zs = [], []
    for i in range(tp):
        hs = slice(i * hpd, (i + 1) * hpd)
        o_i = _attn_heads(q[:, hs], k[:, hs], v[:, hs])
        y_i = o_i @ wo[:, i * hpd * hd:(i + 1) * hpd * hd].T  # partial, no bias
        m_i = x_td + y_i + b_o  # the MLP on device i sees only its own attention partial
        if opt:
            f = w("fc1.weight").shape[0] // tp
            fs = slice(i * f, (i + 1) * f)
            hn = _ln(m_i, w("final_layer_norm.weight"), w("final_layer_norm.bias"))
            z_i = np.maximum(hn @ w("fc1.weight")[fs].T + w("fc1.bias")[fs], 0) @ w("fc2.weight")[:, fs].T
        else:
            f = w("mlp.gate_proj.weight").shape[0] // tp
            fs = slice(i * f, (i + 1) * f)
            hn = _rms(m_i, w("post_attention_layernorm.weight"), cfg.rms_norm_eps)
            g = hn @ w("mlp.gate_proj.weight")[fs].T
            z_i = (g / (1 + np.exp(-g)) * (hn @ w("mlp.up_proj.weight")[fs].T)) @ w("mlp.down_proj.weight")[:, fs].T
        ys.append(y_i)
        zs.append(z_i)
    out = x_td + sum(ys) + b_o + sum(zs) + (w("fc2.bias") if opt else 0.0)
    full_attn = _attn_heads(q, k, v) @ wo.T  # the unsharded attention output
    return out, sum(ys), full_attn


@pytest.mark.parametrize("kind,tp", [("llama", 2), ("llama", 4), ("opt", 2), ("opt", 4)])
def test_spd_block_matches_numpy_equations(tiny_models, kind, tp):
    path, ref = tiny_models[kind]
    _, eng, params = _engine(path, tp, emulate=False)
    tokens = np.random.RandomState(3).randint(3, 90, size=(1, 8)).astype(np.int32)
    fwd = jax.jit(eng.forward(SyncPlan.from_flags((True, False, False)), return_hidden=True))
    _, _, hidden = fwd(params, eng.replicate(tokens), eng.replicate(np.zeros(1, np.int32)), None, jnp.int32(0))
    x0, x1 = np.asarray(hidden[0][0], np.float64), np.asarray(hidden[1][0], np.float64)
    sd = _sd(ref)
    opt = kind == "opt"
    pre = "model.decoder.layers.0" if opt else "model.layers.0"
    out, sum_y, full_attn = _numpy_spd_block(sd, ref.config, x0, tp, pre, opt)
    chex.assert_trees_all_close(x1, out, atol=1e-4, rtol=1e-4)
    # The attention term in the residual stays exact: sum_i Y_i is the unsharded attention output.
    chex.assert_trees_all_close(sum_y, full_attn, atol=1e-9, rtol=1e-9)
    # ... while the block output differs from the sync block (the MLP saw only local partials).
    sync_out, _, _ = _numpy_spd_block(sd, ref.config, x0, 1, pre, opt)
    assert np.abs(sync_out - out).max() > 1e-3
