"""GGUF metadata without PyTorch: the model config and the tokenizer, read with llama.cpp's `gguf` reader.

transformers' own GGUF path (`AutoConfig/AutoTokenizer.from_pretrained(..., gguf_file=...)`) imports
torch, which spd-jax does not otherwise need. Here the header is read by `spd_jax.gguf_file` (once per process) and
mapped to the config fields `spd_jax.config.model_config_from_hf` reads, and a byte-level BPE
vocabulary (`tokenizer.ggml.model == "gpt2"`: SmolLM2, LLaMA-3, Qwen2 files) is rebuilt with the
`tokenizers` library the way transformers' GGUF converter does (tests compare both, token for token).
Other tokenizer kinds (SentencePiece `llama`, e.g. LLaMA-2 GGUFs) go through transformers and need torch.
"""

from __future__ import annotations

import functools
import types
from pathlib import Path
from typing import Any

from spd_jax.arch import GGUF_ARCHS  # GGUF `general.architecture` -> family (the family table's `gguf_arch`)
from spd_jax.config import ConfigError, WeightLoadError

# Pre-tokenizer split rules by `tokenizer.ggml.pre` (as transformers' GGUF converter and llama.cpp use
# them); a kind not listed splits with GPT-2's rule (the byte-level default).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT,
                        "smaug-bpe": _LLAMA3_SPLIT, "dbrx": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
                        "deepseek-r1-qwen": _QWEN2_SPLIT}


def read_header(path: str) -> tuple[dict[str, Any], tuple[str, ...]]:
    """(metadata key -> value, tensor names) of a GGUF file."""
    from spd_jax.gguf_file import read_gguf

    try:
        f = read_gguf(path)
    except Exception as e:  # truncated or foreign files fail in assorted ways
        raise WeightLoadError(f"{path}: not a readable GGUF file: {type(e).__name__}: {e}") from None
    return {k: v for k, v in f.meta.items() if not k.startswith("GGUF.")}, tuple(f.tensors)


def hf_config(path: str | Path) -> types.SimpleNamespace:
    """The transformers-config attributes of a GGUF model (what `model_config_from_hf` reads)."""
    meta, tensors = read_header(str(path))
    arch = meta.get("general.architecture")
    if arch not in GGUF_ARCHS:
        raise ConfigError(f"{path}: GGUF architecture {arch!r} is not supported (supported: {sorted(GGUF_ARCHS)})")

    def get(key, default=None, required=True):
        k = f"{arch}.{key}"
        if k not in meta:
            if required and default is None:
                raise ConfigError(f"{path}: GGUF metadata has no {k!r}")
            return default
        return meta[k]

    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    scaling = get("rope.scaling.type", "none", required=False)
    if scaling not in ("none", "linear"):
        raise ConfigError(f"{path}: GGUF RoPE scaling {scaling!r} is not supported (supported: none, linear)")
    rope = {"rope_type": "default", "rope_theta": float(get("rope.freq_base", 10000.0, required=False))}
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(get("rope.scaling.factor")))
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = get("vocab_size", len(tokens) if tokens is not None else None)
    # a Mistral model is a "llama" GGUF (llama.cpp converts it so): the window it records is applied by the llama
    # family's sliding_window rule (arch.FAMILIES)
    window = get("attention.sliding_window", None, required=False)
    extra = {"sliding_window": int(window)} if window is not None else {}
    return types.SimpleNamespace(**extra,
        model_type=GGUF_ARCHS[arch], vocab_size=int(vocab), hidden_size=hidden,
        num_hidden_layers=int(get("block_count")), num_attention_heads=heads,
        num_key_value_heads=int(get("attention.head_count_kv", heads, required=False)),
        head_dim=int(get("attention.key_length", hidden // heads, required=False)),
        intermediate_size=int(get("feed_forward_length")), max_position_embeddings=int(get("context_length")),
        rms_norm_eps=float(get("attention.layer_norm_rms_epsilon")), rope_parameters=rope, hidden_act="silu",
        tie_word_embeddings="output.weight" not in tensors, attention_bias=False, mlp_bias=False,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"), eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"))


@functools.lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of the 256 byte values (the alphabet of byte-level BPE vocabularies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _byte_level_bpe(meta: dict[str, Any]):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())
    tokens = list(meta["tokenizer.ggml.tokens"])
    vocab = {t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")): i
             for i, t in enumerate(tokens)}
    merges = [tuple(m.split(" ")) for m in meta.get("tokenizer.ggml.merges", [])]
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, continuing_subword_prefix="",
                              end_of_word_suffix="", fuse_unk=False))
    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is None:
        tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    types_ = list(meta.get("tokenizer.ggml.token_type", []))
    # control tokens (type 3) stay whole and are special; user-defined ones (type 4) stay whole
    control = [AddedToken(t, normalized=False, special=True) for t, ty in zip(tokens, types_)
               if ty == 3 and set(t) <= alphabet]
    user = [AddedToken(t, normalized=False, special=False) for t, ty in zip(tokens, types_) if ty == 4 and t in vocab]
    return tk, control, user


def tokenizer(path: str | Path):
    """A transformers fast tokenizer for a GGUF file (torch-free for byte-level BPE vocabularies)."""
    meta, _ = read_header(str(path))
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        return _transformers_tokenizer(Path(path), kind)
    from transformers import PreTrainedTokenizerFast

    tk, control, user = _byte_level_bpe(meta)
    tokens = meta["tokenizer.ggml.tokens"]

    def special(key):
        i = meta.get(f"tokenizer.ggml.{key}")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=special("bos_token_id"), eos_token=special("eos_token_id"),
        unk_token=special("unknown_token_id"), pad_token=special("padding_token_id"),
        add_bos_token=bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        add_eos_token=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        chat_template=meta.get("tokenizer.chat_template"))
    if control:
        tok.add_special_tokens({"additional_special_tokens": control}, replace_extra_special_tokens=False)
    if user:
        tok.add_tokens(user)
    return tok


def _transformers_tokenizer(path: Path, kind: str | None):
    try:
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as e:  # transformers' GGUF tokenizer path imports torch
        raise ConfigError(f"{path}: its {kind!r} tokenizer is built by transformers' GGUF converter, which failed "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); install torch (pip install "
                          "torch) or use the model's Hugging Face directory") from None
