"""Test set-up: 8 simulated CPU devices (TP 2/4/8), tiny random HF models, the embedded model."""

import json
import os
import tempfile

# Must happen before JAX initialises its backends.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent XLA compilation cache for the whole run: the test processes (pytest-xdist workers) and every
# command a test starts (they inherit the variables) compile the same programs of the embedded model many
# times. Cached programs are keyed by their HLO, options and versions, so a stale entry is never reused.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"spd-jax-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


def _tiny_hf(kind: str, path):
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        MistralConfig,
        MistralForCausalLM,
        OPTConfig,
        OPTForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed({"llama": 0, "qwen2": 1, "opt": 2, "llama3": 3, "qwen3": 4, "mistral": 5}[kind])
    if kind in ("llama", "llama3"):
        extra = {}
        if kind == "llama3":
            extra = dict(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 32})
        cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=120, num_hidden_layers=3,
                          num_attention_heads=8, num_key_value_heads=4 if kind == "llama" else 2,
                          max_position_embeddings=128, tie_word_embeddings=(kind == "llama3"),
                          bos_token_id=1, eos_token_id=2, **extra)
        model = LlamaForCausalLM(cfg)
    elif kind == "qwen2":
        cfg = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        model = Qwen2ForCausalLM(cfg)
    elif kind == "qwen3":  # per-head q/k RMSNorm; head_dim 16 != hidden / heads = 8
        cfg = Qwen3Config(vocab_size=89, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                          num_attention_heads=8, num_key_value_heads=4, head_dim=16, max_position_embeddings=128,
                          tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        model = Qwen3ForCausalLM(cfg)
    elif kind == "mistral":  # a sliding window much shorter than the test sequences
        cfg = MistralConfig(vocab_size=107, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
                            num_attention_heads=8, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                            sliding_window=4, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
        model = MistralForCausalLM(cfg)
    else:
        cfg = OPTConfig(vocab_size=103, hidden_size=64, ffn_dim=128, num_hidden_layers=3, num_attention_heads=8,
                        max_position_embeddings=128, word_embed_proj_dim=64, do_layer_norm_before=True,
                        bos_token_id=2, eos_token_id=2, pad_token_id=1)
        model = OPTForCausalLM(cfg)
    # Random init gives tiny biases/norm scales; perturb every parameter so all terms matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    model.eval()
    model.save_pretrained(path)
    return model


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """{kind: (model_dir, torch_model)} for llama (GQA 8/4), llama3 (rope scaling, tied, GQA 8/2), qwen2, opt,
    qwen3 (q/k norms, GQA 8/4, head_dim 16) and mistral (sliding window 4, GQA 8/2)."""
    out = {}
    for kind in ("llama", "llama3", "qwen2", "opt", "qwen3", "mistral"):
        d = tmp_path_factory.mktemp(f"tiny_{kind}")
        out[kind] = (d, _tiny_hf(kind, d))
    return out


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M GGUF, opened once (config, tensors, tokenizer)."""
    from spd_jax.loading import open_model

    lm = open_model("embedded")
    return lm, lm.tokenizer()


@pytest.fixture
def rng():
    return np.random.RandomState(0)


@pytest.fixture(scope="session")
def tokenized_tiny(tmp_path_factory, embedded):
    """A tiny random LLaMA with the embedded model's real tokenizer, and a small text corpus."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, tok = embedded
    d = tmp_path_factory.mktemp("tok_tiny")
    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    from spd_jax.data import wiki_documents

    corpus = d / "corpus.jsonl"
    corpus.write_text("\n".join(json.dumps({"text": t[:2000]}) for t in wiki_documents()[:24]))
    return d, corpus
