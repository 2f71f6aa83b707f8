"""Architecture as data: what each model family is, and what each parameter is.

Two pieces of knowledge used to live in many places keyed on parameter names; they live here.

* `Family`: one small table entry per model family (norm kind, MLP kind, positions, biases, per-head
  q/k norms, checkpoint names in Hugging Face and GGUF files, the paper's distillation learning rate).
  `spd_jax.model` builds its modules from it; `spd_jax.config.model_config_from_hf` reads transformers'
  configs into `ModelConfig`, whose `arch` names the entry.
* `ParamInfo`: the layout every parameter declares where it is created (`model.py`): one logical axis
  name per dimension, its checkpoint tensor names and orientation. Sharding (`sharding.spec_of`),
  loading (padding maps, names, GGUF RoPE rows), the fused inference layout, head-grouping
  permutations and parameter counting all read it. A logical axis not in `LOGICAL_AXES` is an error.

Adding a family: a `Family` entry (and its names), a branch in `model_config_from_hf` if its
transformers config has new fields, and `gguf_arch` for GGUF files (docs/design.md).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Mapping

# logical axis -> (split over the `tp` mesh axis?, padding rule of the loader)
#   kv_heads: kv heads are replicated when tp > n_kv_heads (each device holds the kv head its q heads use)
#   ffn / vocab: padded with zeros up to a multiple of tp (exact: silu(0)*0 = relu(0) = 0; padded logits cut)
#   fused: an inference-only concatenation (q|k|v or gate|up per shard), never read from a checkpoint
LOGICAL_AXES: dict[str, tuple[bool, str | None]] = {
    "embed": (False, None),
    "head_dim": (False, None),
    "positions": (False, None),
    "q_heads": (True, None),
    "kv_heads": (True, "kv"),
    "ffn": (True, "ffn"),
    "vocab": (True, "vocab"),
    "fused": (True, None),
}


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """The layout of one parameter (stored as `nnx.Param` metadata under the key "info")."""

    axes: tuple[str, ...]  # a logical axis per dimension (LOGICAL_AXES)
    hf: str | None = None  # tensor name in a Hugging Face safetensors checkpoint
    gguf: str | None = None  # tensor name in a GGUF file (None: the family has no GGUF form)
    transpose: bool = False  # the checkpoint stores it [out, in] (torch Linear); ours is [in, out]
    gguf_rope: Literal["q", "k"] | None = None  # llama.cpp permuted these rows for its RoPE kernel
    fused_from: tuple[str, ...] = ()  # fused layout: this leaf of the named sibling modules, concatenated per shard

    def __post_init__(self):
        unknown = [a for a in self.axes if a not in LOGICAL_AXES]
        if unknown:
            raise ValueError(f"unknown logical axis {unknown} (known: {sorted(LOGICAL_AXES)})")

    def tp_dim(self) -> int | None:
        """The dimension split over the `tp` mesh axis, or None (replicated)."""
        dims = [d for d, a in enumerate(self.axes) if LOGICAL_AXES[a][0]]
        if len(dims) > 1:
            raise ValueError(f"parameter with axes {self.axes} is split on more than one dimension")
        return dims[0] if dims else None


# Checkpoint names by role; "{i}" is the block index; ".weight" / ".bias" are appended per leaf.
_LLAMA_HF = {
    "embed": "model.embed_tokens", "final_norm": "model.norm", "lm_head": "lm_head",
    "attn_norm": "model.layers.{i}.input_layernorm", "mlp_norm": "model.layers.{i}.post_attention_layernorm",
    "q": "model.layers.{i}.self_attn.q_proj", "k": "model.layers.{i}.self_attn.k_proj",
    "v": "model.layers.{i}.self_attn.v_proj", "o": "model.layers.{i}.self_attn.o_proj",
    "q_norm": "model.layers.{i}.self_attn.q_norm", "k_norm": "model.layers.{i}.self_attn.k_norm",
    "gate": "model.layers.{i}.mlp.gate_proj", "up": "model.layers.{i}.mlp.up_proj",
    "down": "model.layers.{i}.mlp.down_proj",
}
_LLAMA_GGUF = {
    "embed": "token_embd", "final_norm": "output_norm", "lm_head": "output",
    "attn_norm": "blk.{i}.attn_norm", "mlp_norm": "blk.{i}.ffn_norm",
    "q": "blk.{i}.attn_q", "k": "blk.{i}.attn_k", "v": "blk.{i}.attn_v", "o": "blk.{i}.attn_output",
    "q_norm": "blk.{i}.attn_q_norm", "k_norm": "blk.{i}.attn_k_norm",
    "gate": "blk.{i}.ffn_gate", "up": "blk.{i}.ffn_up", "down": "blk.{i}.ffn_down",
}
_OPT_HF = {
    "embed": "model.decoder.embed_tokens", "pos_embed": "model.decoder.embed_positions",
    "final_norm": "model.decoder.final_layer_norm", "lm_head": "lm_head",
    "attn_norm": "model.decoder.layers.{i}.self_attn_layer_norm",
    "mlp_norm": "model.decoder.layers.{i}.final_layer_norm",
    "q": "model.decoder.layers.{i}.self_attn.q_proj", "k": "model.decoder.layers.{i}.self_attn.k_proj",
    "v": "model.decoder.layers.{i}.self_attn.v_proj", "o": "model.decoder.layers.{i}.self_attn.out_proj",
    "fc1": "model.decoder.layers.{i}.fc1", "fc2": "model.decoder.layers.{i}.fc2",
}


@dataclasses.dataclass(frozen=True)
class Family:
    name: str
    norm: Literal["rms", "layer"]  # RMSNorm (scale) or LayerNorm (scale + bias)
    mlp: Literal["swiglu", "relu"]  # gate/up/down without biases, or fc1/fc2 with biases
    positions: Literal["rope", "learned"]  # RoPE on q/k, or learned absolute positions (OPT: offset 2)
    hf: Mapping[str, str]
    gguf: Mapping[str, str] | None = None  # None: no GGUF form
    gguf_rope_permuted: bool = False  # llama.cpp's converter permuted q/k rows (LLaMA-arch GGUFs)
    qk_norm: bool = False  # RMSNorm over head_dim on each q and k head before RoPE (Qwen3)
    mlp_bias: bool = False
    # attention biases as the family's transformers config decides them: always, never, or by its
    # `attention_bias` flag (LLaMA, Qwen3)
    qkv_bias: Literal["yes", "no", "attention_bias"] = "attention_bias"
    o_bias: Literal["yes", "no", "attention_bias"] = "attention_bias"
    # sliding-window attention: "config" applies the config's `sliding_window` when it names one (Mistral; a
    # LLaMA-arch GGUF of a Mistral model), "refuse" refuses a config with `use_sliding_window` (Qwen2/3's
    # per-layer windows), "none": the family has no window
    sliding_window: Literal["config", "refuse", "none"] = "none"
    gguf_arch: str | None = None  # the GGUF `general.architecture` read as this family (None: no GGUF form)
    distill_lr: float = 5e-5  # the paper's block-to-block learning rate for the family

    def bias(self, rule: str, hf_config) -> bool:
        """A bias rule (`qkv_bias` / `o_bias` value) applied to a transformers config."""
        return rule == "yes" or (rule == "attention_bias" and bool(getattr(hf_config, "attention_bias", False)))

    def names(self, role: str, block: int | None = None) -> tuple[str | None, str | None]:
        """(HF name, GGUF name) prefixes of a role, e.g. ("model.layers.3.self_attn.q_proj", "blk.3.attn_q")."""
        if role not in self.hf:
            raise KeyError(f"family {self.name!r} has no parameter role {role!r}")
        hf = self.hf[role].format(i=block)
        gg = self.gguf.get(role) if self.gguf is not None else None
        return hf, None if gg is None else gg.format(i=block)


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "rms", "swiglu", "rope", _LLAMA_HF, _LLAMA_GGUF, gguf_rope_permuted=True,
                    sliding_window="config", gguf_arch="llama"),
    # Mistral: LLaMA blocks with sliding-window attention (ModelConfig.sliding_window); llama.cpp writes
    # Mistral-7B as a LLaMA-arch GGUF (permuted q/k rows), read as "llama" with the window it records.
    "mistral": Family("mistral", "rms", "swiglu", "rope", _LLAMA_HF, _LLAMA_GGUF, gguf_rope_permuted=True,
                      o_bias="no", sliding_window="config"),
    "qwen2": Family("qwen2", "rms", "swiglu", "rope", _LLAMA_HF, _LLAMA_GGUF, qkv_bias="yes", o_bias="no",
                    sliding_window="refuse", gguf_arch="qwen2"),
    "qwen3": Family("qwen3", "rms", "swiglu", "rope", _LLAMA_HF, _LLAMA_GGUF, qk_norm=True,
                    sliding_window="refuse", gguf_arch="qwen3"),
    "opt": Family("opt", "layer", "relu", "learned", _OPT_HF, None, mlp_bias=True, qkv_bias="yes", o_bias="yes",
                  distill_lr=1e-6),
}


# GGUF `general.architecture` -> the family it is read as
GGUF_ARCHS: dict[str, str] = {f.gguf_arch: f.name for f in FAMILIES.values() if f.gguf_arch is not None}
