"""Qwen3 (per-head q/k RMSNorm) and Mistral (sliding-window attention), against independent references:
transformers' PyTorch models (sync logits and greedy tokens, TP 1/2/4/8), a float64 NumPy model written
from the SPD equations (SPD logits and greedy tokens, shard by shard) and GGUF files written here with
llama.cpp's `gguf` writer (the loader's GGUF path)."""

import chex
import numpy as np
import pytest
import torch

from spd_jax.config import GenerationConfig
from spd_jax.generate import Generator
from spd_jax.loading import load_params, open_model
from spd_jax.plan import SyncPlan
from spd_jax.runtime import Engine, build_model_def

FAMILIES = ("qwen3", "mistral")


# ----------------------------------------------------------------------------- float64 NumPy reference


def _sd(model):
    return {k: v.detach().numpy().astype(np.float64) for k, v in model.state_dict().items()}


def _rms(x, w, eps):
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * w


def _rope(x_thd, theta):
    t, _, d = x_thd.shape
    inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
    f = np.arange(t)[:, None] * inv[None, :]
    cos, sin = np.cos(np.concatenate([f, f], -1))[:, None], np.sin(np.concatenate([f, f], -1))[:, None]
    return x_thd * cos + np.concatenate([-x_thd[..., d // 2:], x_thd[..., : d // 2]], -1) * sin


def _attention(q_thd, k_thd, v_thd, window):
    t, h, d = q_thd.shape
    s = np.einsum("thd,shd->hts", q_thd, k_thd) / np.sqrt(d)
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    allowed = (j <= i) & ((i - j < window) if window else True)
    s = np.where(allowed[None], s, -np.inf)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("hts,shd->thd", p, v_thd).reshape(t, h * d)


def _block(sd, cfg, x, i, tp):
    """One decoder block by the SPD equations with `tp` shards (tp = 1 is the sync block)."""
    w = lambda n: sd[f"model.layers.{i}.{n}"]  # noqa: E731
    eps, hd = cfg.rms_norm_eps, cfg.head_dim
    hq, hk = cfg.num_attention_heads, cfg.num_key_value_heads
    theta = cfg.rope_parameters["rope_theta"]
    window = getattr(cfg, "sliding_window", None) if cfg.model_type == "mistral" else None
    h = _rms(x, w("input_layernorm.weight"), eps)
    q = (h @ w("self_attn.q_proj.weight").T).reshape(len(x), hq, hd)
    k = (h @ w("self_attn.k_proj.weight").T).reshape(len(x), hk, hd)
    v = (h @ w("self_attn.v_proj.weight").T).reshape(len(x), hk, hd)
    if cfg.model_type == "qwen3":
        q, k = _rms(q, w("self_attn.q_norm.weight"), eps), _rms(k, w("self_attn.k_norm.weight"), eps)
    q, k = _rope(q, theta), _rope(k, theta)
    k, v = np.repeat(k, hq // hk, axis=1), np.repeat(v, hq // hk, axis=1)
    wo = w("self_attn.o_proj.weight")
    f = w("mlp.gate_proj.weight").shape[0] // tp
    hs = hq // tp
    out = x.copy()
    for s in range(tp):
        heads, ffn = slice(s * hs, (s + 1) * hs), slice(s * f, (s + 1) * f)
        y = _attention(q[:, heads], k[:, heads], v[:, heads], window) @ wo[:, s * hs * hd:(s + 1) * hs * hd].T
        hn = _rms(x + y, w("post_attention_layernorm.weight"), eps)  # tp = 1: the sync block's H
        g = hn @ w("mlp.gate_proj.weight")[ffn].T
        z = (g / (1 + np.exp(-g)) * (hn @ w("mlp.up_proj.weight")[ffn].T)) @ w("mlp.down_proj.weight")[:, ffn].T
        out += y + z
    return out


def _numpy_logits(sd, cfg, tokens, tp, spd_blocks):
    x = sd["model.embed_tokens.weight"][np.asarray(tokens)]
    for i in range(cfg.num_hidden_layers):
        x = _block(sd, cfg, x, i, tp if i in spd_blocks else 1)
    return _rms(x, sd["model.norm.weight"], cfg.rms_norm_eps) @ sd["lm_head.weight"].T


# ----------------------------------------------------------------------------- tests


def _open(path, tp, emulate=False):
    lm = open_model(path)
    eng = Engine.create(build_model_def(lm.cfg, tp), emulate=emulate)
    return lm, eng, load_params(eng, lm.source)


def test_configs_read_the_family_fields(tiny_models):
    q = open_model(tiny_models["qwen3"][0]).cfg
    m = open_model(tiny_models["mistral"][0]).cfg
    assert (q.arch, q.head_dim, q.family.qk_norm, q.sliding_window, q.qkv_bias) == ("qwen3", 16, True, None, False)
    assert (m.arch, m.sliding_window, m.family.qk_norm) == ("mistral", 4, False)


def test_the_numpy_reference_is_the_pytorch_model(tiny_models):
    """The NumPy model (used below for SPD) agrees with transformers in sync mode, so it is a valid referee."""
    for kind in FAMILIES:
        _, ref = tiny_models[kind]
        tokens = np.random.RandomState(0).randint(3, 80, size=11)
        with torch.no_grad():
            want = ref(torch.tensor(np.array([tokens]))).logits.numpy()[0]
        chex.assert_trees_all_close(_numpy_logits(_sd(ref), ref.config, tokens, 1, ()), want, atol=2e-5, rtol=1e-4)


def test_sliding_window_matters_in_the_test_model(tiny_models):
    _, ref = tiny_models["mistral"]
    sd, cfg = _sd(ref), ref.config
    tokens = np.random.RandomState(1).randint(3, 100, size=12)
    windowed = _numpy_logits(sd, cfg, tokens, 1, ())
    cfg_full = type(cfg)(**{**cfg.to_dict(), "sliding_window": None})
    full = _numpy_logits(sd, cfg_full, tokens, 1, ())
    assert np.abs(windowed[:4] - full[:4]).max() < 1e-9  # inside the window: the same
    assert np.abs(windowed[6:] - full[6:]).max() > 1e-3  # beyond it: different


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("tp", [2, 4])
def test_spd_logits_match_the_numpy_spd_equations(tiny_models, kind, tp):
    path, ref = tiny_models[kind]
    lm, eng, params = _open(path, tp)
    tokens = np.random.RandomState(tp).randint(3, 80, size=(1, 12)).astype(np.int32)
    for blocks in ([0, 1, 2], [1]):
        ours = np.asarray(eng.logits(params, tokens, plan=SyncPlan.from_blocks(blocks, 3)))[0]
        want = _numpy_logits(_sd(ref), ref.config, tokens[0], tp, blocks)
        chex.assert_trees_all_close(ours, want, atol=5e-5, rtol=1e-4)
    sync = _numpy_logits(_sd(ref), ref.config, tokens[0], tp, [])
    assert np.abs(want - sync).max() > 1e-3  # SPD really changed the result


@pytest.mark.parametrize("kind", FAMILIES)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_greedy_tokens_match(tiny_models, kind, tp):
    """Sync: transformers' generate (KV cache, sliding-window cache for Mistral). SPD on all blocks: the
    NumPy SPD model, recomputed per token. Our decode path uses the KV cache."""
    path, ref = tiny_models[kind]
    lm, eng, params = _open(path, tp)
    prompt = [int(t) for t in np.random.RandomState(7).randint(3, 80, size=6)]
    gen = GenerationConfig(max_new_tokens=10, stop_at_eos=False)
    ours = Generator(eng, params, SyncPlan.sync(3)).generate([prompt], gen).tokens[0]
    with torch.no_grad():
        want = ref.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                            attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    assert ours == want
    if tp > 1:
        ours_spd = Generator(eng, params, SyncPlan.all_spd(3)).generate([prompt], gen).tokens[0]
        seq, sd = list(prompt), _sd(ref)
        for _ in range(10):
            seq.append(int(_numpy_logits(sd, ref.config, seq, tp, [0, 1, 2])[-1].argmax()))
        assert ours_spd == seq[len(prompt):]


# ----------------------------------------------------------------------------- GGUF


def _write_gguf(path, model, arch: str, permute_qk: bool, window: int | None):
    """A float32 GGUF of a transformers model, with llama.cpp's tensor names and header keys."""
    import gguf

    cfg = model.config
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    w = gguf.GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", cfg.num_hidden_layers)
    w.add_uint32(f"{arch}.context_length", cfg.max_position_embeddings)
    w.add_uint32(f"{arch}.embedding_length", cfg.hidden_size)
    w.add_uint32(f"{arch}.feed_forward_length", cfg.intermediate_size)
    w.add_uint32(f"{arch}.attention.head_count", cfg.num_attention_heads)
    w.add_uint32(f"{arch}.attention.head_count_kv", cfg.num_key_value_heads)
    w.add_uint32(f"{arch}.attention.key_length", cfg.head_dim)
    w.add_uint32(f"{arch}.vocab_size", cfg.vocab_size)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", cfg.rms_norm_eps)
    w.add_float32(f"{arch}.rope.freq_base", cfg.rope_parameters["rope_theta"])
    if window is not None:
        w.add_uint32(f"{arch}.attention.sliding_window", window)

    def permute(t, n_head):  # convert_hf_to_gguf.py's LlamaModel.permute
        return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)

    names = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
             "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
             "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            key = f"model.layers.{i}.{hf}.weight"
            if key not in sd:
                continue
            t = sd[key]
            if permute_qk and hf == "self_attn.q_proj":
                t = permute(t, cfg.num_attention_heads)
            elif permute_qk and hf == "self_attn.k_proj":
                t = permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.mark.parametrize("kind", FAMILIES)
def test_gguf_files_load_to_the_same_model(tiny_models, tmp_path, kind):
    path, ref = tiny_models[kind]
    gpath = tmp_path / f"{kind}.gguf"
    if kind == "qwen3":
        _write_gguf(gpath, ref, "qwen3", permute_qk=False, window=None)
    else:  # llama.cpp writes Mistral as a LLaMA-arch GGUF with RoPE-permuted q/k rows
        _write_gguf(gpath, ref, "llama", permute_qk=True, window=ref.config.sliding_window)
    lm = open_model(gpath)
    assert lm.cfg.sliding_window == ref.config.sliding_window if kind == "mistral" else lm.cfg.family.qk_norm
    eng = Engine.create(build_model_def(lm.cfg, 2))
    params = load_params(eng, lm.source)
    tokens = np.random.RandomState(2).randint(3, 80, size=(1, 12)).astype(np.int32)
    with torch.no_grad():
        want = ref(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    chex.assert_trees_all_close(np.asarray(eng.logits(params, tokens)), want, atol=2e-5, rtol=1e-4)
