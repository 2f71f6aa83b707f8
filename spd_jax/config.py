"""Typed configuration: model architecture, run settings, YAML loading.

`ModelConfig` is the architecture as our model code needs it (built from a transformers config).
`RunConfig` is what a user writes in `configs/*.yaml`: where the model comes from, the TP degree,
which blocks drop their attention sync point, dtype and generation settings. CLI flags override it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from spd_jax.arch import FAMILIES  # the family table: the one registry of architecture names


class ConfigError(ValueError):
    """A configuration value is invalid; the message says which and what is allowed."""


class WeightLoadError(RuntimeError):
    """Weights or a model folder cannot be read: missing, truncated or damaged files (the message names them)."""


class ContextLengthError(ConfigError):
    """A sequence does not fit the model's context (its `max_position`)."""


def _type_ok(value: Any, tp: Any) -> bool:
    """Whether `value` fits the annotation `tp` (the subset of types our config dataclasses use)."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:  # an int is a fine float; a bool is not
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if origin in (tuple, list):
        return isinstance(value, (tuple, list))
    if dataclasses.is_dataclass(tp):
        return isinstance(value, tp)
    return True


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " or ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def check_types(obj: Any, where: str) -> None:
    """Raise ConfigError if a field of dataclass `obj` (recursively) does not match its annotation.

    Catches wrong-typed YAML values (`tp: "4"`, `epochs: 1.5`, `lr: fast`) before any work starts,
    instead of a TypeError deep inside a stage. Floats that are NaN or infinite are refused too.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        tp = hints.get(f.name, Any)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            check_types(v, f"{where}.{f.name}")
            continue
        if not _type_ok(v, tp):
            raise ConfigError(f"{where}: {f.name} must be {_describe(tp)}, got {v!r} ({type(v).__name__})")
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{where}: {f.name} must be a finite number, got {v}")


Arch = Literal[tuple(FAMILIES)]  # the entries of spd_jax.arch.FAMILIES


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    kind: Literal["default", "llama3", "linear"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    arch: Arch
    vocab_size: int
    hidden: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    max_position: int
    norm_eps: float = 1e-5
    rope: RopeConfig | None = RopeConfig()
    tie_embeddings: bool = False
    qkv_bias: bool = False  # qwen2 and OPT
    o_bias: bool = False  # OPT
    sliding_window: int | None = None  # Mistral: a query attends to the last `sliding_window` positions
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    @property
    def family(self):
        """The architecture's table entry (spd_jax.arch.Family): norm, MLP, positions, names."""
        return FAMILIES[self.arch]

    def check_fits(self, n_tokens: int, what: str, hint: str = "") -> None:
        """Refuse `n_tokens` positions beyond the model's context, for every family alike: learned positions
        (OPT) have no row past it, and RoPE models were never trained there."""
        if n_tokens > self.max_position:
            raise ContextLengthError(f"{what} of {n_tokens} tokens exceeds the model's context of {self.max_position} "
                                     f"tokens" + (f"; {hint}" if hint else ""))

    def validate(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        for name in ("vocab_size", "hidden", "n_layers", "n_heads", "head_dim", "intermediate"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError(f"model config: sliding_window must be >= 1 or null, got {self.sliding_window}")
        if (self.rope is None) != (self.family.positions == "learned"):
            raise ConfigError(f"model config: {self.arch} uses {self.family.positions} positions, rope={self.rope}")


def _rope_from_hf(hf: Any) -> RopeConfig:
    params = getattr(hf, "rope_parameters", None) or getattr(hf, "rope_scaling", None) or {}
    theta = params.get("rope_theta", getattr(hf, "rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    if kind == "default":
        return RopeConfig(theta=float(theta))
    if kind == "linear":
        return RopeConfig(theta=float(theta), kind="linear", factor=float(params["factor"]))
    if kind == "llama3":
        return RopeConfig(
            theta=float(theta),
            kind="llama3",
            factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position=int(params["original_max_position_embeddings"]),
        )
    raise ConfigError(f"RoPE type {kind!r} is not supported (supported: default, linear, llama3)")


def _eos_ids(hf: Any) -> tuple[int, ...]:
    eos = getattr(hf, "eos_token_id", None)
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),)


SUPPORTED_ARCHS = tuple(FAMILIES)


def model_config_from_hf(hf: Any) -> ModelConfig:
    """Build a ModelConfig from a transformers PretrainedConfig (LLaMA, Mistral, Qwen2, Qwen3 or OPT)."""
    mt = getattr(hf, "model_type", None)
    if mt not in SUPPORTED_ARCHS:
        raise ConfigError(f"unknown architecture {mt!r}: spd-jax supports {', '.join(SUPPORTED_ARCHS)}")
    common = dict(
        vocab_size=hf.vocab_size,
        hidden=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        n_heads=hf.num_attention_heads,
        bos_token_id=getattr(hf, "bos_token_id", None),
        eos_token_ids=_eos_ids(hf),
        pad_token_id=getattr(hf, "pad_token_id", None),
    )
    fam = FAMILIES[mt]
    if mt == "opt":
        if not getattr(hf, "do_layer_norm_before", True):
            raise ConfigError("OPT with do_layer_norm_before=False (opt-350m, post-LN) is not supported")
        if getattr(hf, "word_embed_proj_dim", hf.hidden_size) != hf.hidden_size:
            raise ConfigError("OPT with word_embed_proj_dim != hidden_size (opt-350m) is not supported")
        if not getattr(hf, "enable_bias", True) or not getattr(hf, "layer_norm_elementwise_affine", True):
            raise ConfigError("OPT without biases or affine layer norms is not supported")
        shape = dict(n_kv_heads=hf.num_attention_heads, head_dim=hf.hidden_size // hf.num_attention_heads,
                     intermediate=hf.ffn_dim, norm_eps=1e-5, rope=None,
                     tie_embeddings=bool(getattr(hf, "tie_word_embeddings", True)))
    else:
        if getattr(hf, "hidden_act", "silu") != "silu":
            raise ConfigError(f"hidden_act {hf.hidden_act!r} not supported for {mt} (only silu)")
        if getattr(hf, "mlp_bias", False):
            raise ConfigError(f"{mt} with mlp_bias=True is not supported")
        shape = dict(n_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
                     head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
                     intermediate=hf.intermediate_size, norm_eps=float(hf.rms_norm_eps), rope=_rope_from_hf(hf),
                     tie_embeddings=bool(getattr(hf, "tie_word_embeddings", False)))
    if fam.sliding_window == "refuse" and getattr(hf, "use_sliding_window", False):
        raise ConfigError(f"{mt} with use_sliding_window=True (per-layer windows) is not supported")
    window = getattr(hf, "sliding_window", None) if fam.sliding_window == "config" else None
    cfg = ModelConfig(arch=mt, max_position=hf.max_position_embeddings, qkv_bias=fam.bias(fam.qkv_bias, hf),
                      o_bias=fam.bias(fam.o_bias, hf), sliding_window=None if window is None else int(window),
                      **shape, **common)
    cfg.validate()
    return cfg


# ----------------------------------------------------------------------------- run configuration

# How a decode step attends: "xla" (masked attention in plain JAX) or "pallas" (spd_jax.kernels); a config may
# also ask for "auto", resolved per device (spd_jax.kernels.resolve_attention_kernel)
ATTENTION_KERNELS = ("xla", "pallas")
ATTENTION_KERNEL_CHOICES = ("auto", *ATTENTION_KERNELS)
# Which rows of the shadow row's two the decode all-reduces carry (plan.DecodePath.shadow_allreduce)
SHADOW_ALLREDUCE = ("first", "both")
# The attention kernel's Triton settings a run may set (`attention_tune: "key=int,..."`; kernels._plan)
KERNEL_TUNE_KEYS = ("block_k", "num_warps", "num_stages", "single_pass_max")


def parse_kernel_tune(text: str, what: str = "attention_tune") -> tuple[tuple[str, int], ...]:
    """`"block_k=256,num_warps=8"` -> (("block_k", 256), ("num_warps", 8)), sorted; "" -> (). A ConfigError
    names a bad item."""
    out = {}
    for item in filter(None, (x.strip() for x in (text or "").split(","))):
        key, _, val = item.partition("=")
        key, val = key.strip(), val.strip()
        if key not in KERNEL_TUNE_KEYS or not val.isdigit():
            raise ConfigError(f"{what}: expected comma-separated key=int with keys {', '.join(KERNEL_TUNE_KEYS)}, "
                              f"got {item!r}")
        out[key] = int(val)
    return tuple(sorted(out.items()))


@dataclasses.dataclass
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    seed: int = 0
    stop_at_eos: bool = True
    decode_chunk: int = 8  # decode steps between on-device checks of the stop condition (1 = every step)
    # decode attends over the filled part of the KV cache, in windows that double from this many slots
    # (one compiled loop per window); 0 = every step attends over the whole allocated cache
    attend_window: int = 256
    # batch-1 decode runs its blocks on two identical rows (no pad/slice kernels around each projection;
    # see model.Transformer); False = one row, each product padded to two rows
    shadow_row: bool = True
    # decode attention: "xla" (masked attention in plain JAX), "pallas" (our Pallas kernel over the filled cache
    # slots, spd_jax.kernels) or "auto": the kernel on CUDA GPUs where it applies, else "xla"
    # (kernels.resolve_attention_kernel; docs/performance.md, 2026-11-29)
    attention_kernel: str = "auto"
    # developer knobs for benchmarks (bench: --shadow-allreduce, --attention-tune): the shadow row's
    # all-reduces carry the first row ("first") or both ("both"; docs/performance.md, "All-reduce"); the
    # attention kernel's Triton settings, "key=int,..." (KERNEL_TUNE_KEYS; "" = the kernel's defaults)
    shadow_allreduce: str = "first"
    attention_tune: str = ""

    def validate(self) -> None:
        check_types(self, "generation")
        if self.max_new_tokens < 1:
            raise ConfigError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.decode_chunk < 1:
            raise ConfigError(f"decode_chunk must be >= 1, got {self.decode_chunk}")
        if self.attention_kernel not in ATTENTION_KERNEL_CHOICES:
            raise ConfigError(f"attention_kernel must be 'auto', 'xla' or 'pallas', got {self.attention_kernel!r}")
        if self.attend_window < 0:
            raise ConfigError(f"attend_window must be >= 0 (0 = the whole cache), got {self.attend_window}")
        if self.shadow_allreduce not in SHADOW_ALLREDUCE:
            raise ConfigError(f"shadow_allreduce must be 'first' or 'both', got {self.shadow_allreduce!r}")
        parse_kernel_tune(self.attention_tune)


# How the block all-reduces are done (spd_jax.collectives): NCCL's psum, or a one-shot exchange for small
# messages; "auto" picks per message size from a measured choice table
ALLREDUCE_METHODS = ("psum", "gather", "a2a")
ALLREDUCE_CHOICES = (*ALLREDUCE_METHODS, "auto")

# messages above this many bytes keep NCCL's psum whatever the one-shot method (collectives.AllReduce):
# at TP 4 the all-to-all lost to NCCL at 1 MiB on every link measured (docs/benchmarks.md, 2026-11-28)
ALLREDUCE_MAX_BYTES = 256 << 10
ALLREDUCE_MEASURE = "measure"  # allreduce_table value: measure the choice table at start-up


@dataclasses.dataclass
class ModelSettings:
    """Which model runs and how it is split: the fields every command that loads a model shares (the run
    config and the pipeline config extend this one declaration; `cli.model_flags` sets them from flags)."""

    model: str = "embedded"  # "embedded", an HF model directory, or a .gguf file
    tp: int = 1
    dtype: Literal["float32", "bfloat16"] = "float32"
    emulate: bool = False  # run N-way TP on one device (vmap over shards) instead of N devices
    spd_attn_bias: Literal["full", "none"] = "full"  # see docs/design.md (OPT bias in the MLP input)

    def validate_model_settings(self) -> None:
        if self.tp < 1:
            raise ConfigError(f"tp must be >= 1, got {self.tp}")


@dataclasses.dataclass
class RunConfig(ModelSettings):
    spd_blocks: str | None = None  # "none", "all", or "0,2,5-9" (unset: none)
    spd_plan: str | None = None  # plan.json written by the SPD pipeline (with `checkpoint`: used instead of its plan)
    checkpoint: str | None = None  # output dir of the SPD pipeline: distilled params + its plan.json
    # inference layouts (runtime.inference_layout): q/k/v and gate/up as single GEMMs (runtime.fuse_projections),
    # RMSNorm weights folded into the projections (runtime.fold_norms). None = the session's default: on for
    # generation (fold where the family uses RMSNorm; the fastest decode measured, docs/performance.md), off for
    # evaluation (the reference layout)
    fused_projections: bool | None = None
    fold_norms: bool | None = None
    # the block all-reduces: NCCL's psum, or a one-shot exchange for messages of at most allreduce_max_bytes
    # (spd_jax/collectives.py; `launch/bench.py --allreduce-methods` measures which is faster on a link), or
    # "auto": per message size, the method measured fastest in allreduce_table (a launch/bench.py --json result
    # of this TP degree and link, measured with --allreduce-methods psum,gather,a2a), or with allreduce_table
    # "measure" measured at start-up on this run's devices at its own message sizes (inference.allreduce_of)
    allreduce: Literal[ALLREDUCE_CHOICES] = "psum"
    allreduce_max_bytes: int = ALLREDUCE_MAX_BYTES
    allreduce_table: str | None = None
    generation: GenerationConfig = dataclasses.field(default_factory=GenerationConfig)

    def validate(self) -> None:
        check_types(self, "config")
        self.validate_model_settings()
        if self.spd_blocks is not None and (self.spd_plan or self.checkpoint):
            other = "spd_plan (--spd-plan)" if self.spd_plan else "checkpoint (--checkpoint), which carries its plan"
            raise ConfigError(f"spd_blocks (--spd-blocks {self.spd_blocks}) and {other} both say which blocks drop "
                              f"their sync point: give one of them")
        if self.allreduce_max_bytes < 0:
            raise ConfigError(f"allreduce_max_bytes must be >= 0, got {self.allreduce_max_bytes}")
        if self.allreduce == "auto" and not self.allreduce_table:
            raise ConfigError("allreduce: auto needs allreduce_table (a launch/bench.py --json result measured with "
                              "--allreduce-methods psum,gather,a2a on this link and TP degree)")
        if self.allreduce_table and self.allreduce != "auto":
            raise ConfigError(f"allreduce_table is only read with allreduce: auto (allreduce is {self.allreduce!r})")
        if self.allreduce_table == ALLREDUCE_MEASURE and (self.tp < 2 or self.emulate):
            raise ConfigError("allreduce_table: measure times the all-reduces of this run's devices: it needs TP >= 2 "
                              "on real devices (not emulate)")
        self.generation.validate()


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML config file as a mapping; a missing file, bad syntax or a non-mapping is a ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}" if not p.exists() else f"config path {p} is not a file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config file {p} is not valid YAML: {' '.join(str(e).split())}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p}: expected a mapping of keys to values, got {type(data).__name__}")
    return data


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping; nested dataclass fields from nested mappings. Unknown keys
    are refused with the allowed ones listed; types are checked by the dataclass's `validate`."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(fields)}")
    kwargs = {}
    for k, v in data.items():
        tp = hints.get(k)
        kwargs[k] = from_dict(tp, v, f"{where}.{k}") if dataclasses.is_dataclass(tp) else v
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def apply_overrides(cfg: Any, overrides: dict[str, Any] | None) -> Any:
    """Set non-None values of dotted keys (e.g. {"generation.max_new_tokens": 20}) on a config."""
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        target = cfg
        parts = key.split(".")
        for part in parts[:-1]:
            target = getattr(target, part)
        if not hasattr(target, parts[-1]):
            raise ConfigError(f"unknown override {key!r}")
        setattr(target, parts[-1], value)
    return cfg


def load_run_config(path: str | Path | None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Load a YAML run config (or defaults when path is None) and apply non-None overrides.

    Overrides use dotted keys for nested fields, e.g. {"generation.max_new_tokens": 20}. A relative
    `spd_plan` or `checkpoint` path written in the YAML file is relative to that file's folder.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        base = Path(path).parent
        for key in ("spd_plan", "checkpoint"):
            v = data.get(key)
            if isinstance(v, str) and not Path(v).expanduser().is_absolute():
                data[key] = str(base / v)
    cfg = apply_overrides(from_dict(RunConfig, data, str(path or "config")), overrides)
    cfg.validate()
    return cfg


def parse_block_spec(spec: str | None, n_layers: int) -> tuple[bool, ...]:
    """Parse "all" / "none" / "0,2,5-9" into a per-block SPD flag tuple (True = drop attention sync)."""
    if spec is None or spec.strip().lower() in ("", "none"):
        return (False,) * n_layers
    if spec.strip().lower() == "all":
        return (True,) * n_layers
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if a > b:
                    raise ConfigError(f"block range {part!r} is reversed")
                chosen.update(range(a, b + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise ConfigError(f"bad block spec {spec!r}: use 'all', 'none' or e.g. '0,2,5-9'") from None
    bad = sorted(i for i in chosen if not 0 <= i < n_layers)
    if bad:
        raise ConfigError(f"block index(es) {bad} out of range: the model has blocks 0..{n_layers - 1}")
    return tuple(i in chosen for i in range(n_layers))


def ceil_to(n: int, m: int) -> int:
    return int(math.ceil(n / m) * m)
