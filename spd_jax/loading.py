"""Load real weights into TP shards: Hugging Face safetensors directories and GGUF files.

Each parameter of our global layout is described by a `ParamSource`: the checkpoint tensor it comes
from, whether it is transposed (HF Linear weights are [out, in], ours [in, out]) and index maps for
padding/replication (-1 = a zero row/column). Arrays are built with `jax.make_array_from_callback`, so
each device's shard is read from the memory-mapped file on its own: no host ever materialises a full
unsharded copy per device, and in a multi-process run each process reads only its devices' shards.

safetensors: read with `np.memmap` + `ml_dtypes` (the `safetensors` package's NumPy backend cannot
represent bfloat16, the dtype of most LLaMA checkpoints). GGUF: `gguf.GGUFReader` + `gguf.dequantize`,
one tensor at a time; the llama.cpp Q/K RoPE permutation is undone as transformers does.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np

from spd_jax.config import ConfigError, ModelConfig, model_config_from_hf
from spd_jax.runtime import Engine, ModelDef, Params, path_names


class WeightLoadError(RuntimeError):
    """A weight file is missing, corrupt, or does not match the model config."""


# ----------------------------------------------------------------------------- tensor sources

_ST_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}


class SafetensorsFile:
    """Lazy, memory-mapped view of one .safetensors file."""

    def __init__(self, path: Path):
        self.path = path
        size = path.stat().st_size
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                if n <= 0 or 8 + n > size:
                    raise ValueError(f"header length {n} exceeds file size {size}")
                header = json.loads(f.read(n))
        except (struct.error, ValueError, UnicodeDecodeError) as e:
            raise WeightLoadError(f"{path}: not a valid safetensors file (corrupt or truncated): {e}") from None
        header.pop("__metadata__", None)
        self.base = 8 + n
        for name, info in header.items():
            end = info["data_offsets"][1]
            if self.base + end > size:
                raise WeightLoadError(f"{path}: tensor {name!r} ends at byte {self.base + end} but the file has "
                                      f"{size} bytes (truncated download?)")
            if info["dtype"] not in _ST_DTYPES:
                raise WeightLoadError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']}")
        self.header = header
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def names(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        s, e = info["data_offsets"]
        return self._mm[self.base + s : self.base + e].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


class TensorSource:
    """name -> lazily read numpy array (HF orientation and names)."""

    def names(self) -> set[str]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    def __init__(self, model_dir: Path):
        index = model_dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise WeightLoadError(f"{index}: corrupt safetensors index: {e}") from None
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in model_dir.glob("*.safetensors"))
            weight_map = None
        if not files:
            raise WeightLoadError(f"{model_dir}: no *.safetensors weight files found")
        missing = [f for f in files if not (model_dir / f).is_file()]
        if missing:
            raise WeightLoadError(f"{model_dir}: weight file(s) listed in the index are missing: {missing}")
        self.files = {f: SafetensorsFile(model_dir / f) for f in files}
        self.where = {}
        for f, sf in self.files.items():
            for n in sf.names():
                self.where[n] = f
        if weight_map is not None:
            absent = sorted(n for n in weight_map if n not in self.where)
            if absent:
                raise WeightLoadError(f"{model_dir}: tensors in the index not found in the files: {absent[:5]}")

    def names(self):
        return set(self.where)

    def get(self, name):
        return self.files[self.where[name]].get(name)


_GGUF_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"model.layers.\1.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"model.layers.\1.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", r"model.layers.\1.self_attn.q_proj.\2"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", r"model.layers.\1.self_attn.k_proj.\2"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", r"model.layers.\1.self_attn.v_proj.\2"),
    (r"blk\.(\d+)\.attn_output\.weight", r"model.layers.\1.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"model.layers.\1.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"model.layers.\1.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"model.layers.\1.mlp.down_proj.weight"),
]


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `permute`)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GGUFSource(TensorSource):
    """Dequantised tensors of a GGUF file, under Hugging Face names."""

    def __init__(self, path: Path, cfg: ModelConfig):
        import gguf

        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the reader raises assorted errors on a corrupt file
            raise WeightLoadError(f"{path}: not a readable GGUF file: {type(e).__name__}: {e}") from None
        self._dequantize = gguf.dequantize
        self.cfg = cfg
        self.tensors = {}
        for t in self.reader.tensors:
            for pat, rep in _GGUF_NAMES:
                if re.fullmatch(pat, t.name):
                    self.tensors[re.sub(pat, rep, t.name)] = t
                    break
        self._cache: tuple[str, np.ndarray] | None = None

    def names(self):
        return set(self.tensors)

    def get(self, name):
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        t = self.tensors[name]
        w = np.asarray(self._dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(x) for x in reversed(t.shape)))  # ggml ne is [in, out]: reverse
        if self.cfg.arch == "llama" and name.endswith("q_proj.weight"):
            w = unpermute_rope(w, self.cfg.n_heads)
        elif self.cfg.arch == "llama" and name.endswith("k_proj.weight"):
            w = unpermute_rope(w, self.cfg.n_kv_heads)
        self._cache = (name, w)  # shards of one tensor are read one after another
        return w


# ----------------------------------------------------------------------------- our layout <- HF names


@dataclasses.dataclass(frozen=True)
class ParamSource:
    hf_name: str
    transpose: bool = False
    maps: tuple[np.ndarray | None, ...] = ()  # per global dim: index into the (transposed) tensor, -1 = 0

    def __hash__(self):
        return hash(self.hf_name)


def _hf_name(cfg: ModelConfig, path: tuple) -> tuple[str, bool]:
    """HF tensor name and whether it is a Linear weight ([out, in] -> transpose)."""
    opt = cfg.is_opt
    root = "model.decoder" if opt else "model"
    if path == ("embed", "w"):
        return f"{root}.embed_tokens.weight", False
    if path == ("pos_embed",):
        return f"{root}.embed_positions.weight", False
    if path == ("lm_head", "w"):
        return "lm_head.weight", True
    if path[0] == "final_norm":
        return f"{root}.{'final_layer_norm' if opt else 'norm'}.{'weight' if path[1] == 'scale' else 'bias'}", False
    assert path[0] == "layers", path
    i, sub = path[1], path[2:]
    pre = f"{root}.layers.{i}"
    if sub[0] in ("attn_norm", "mlp_norm"):
        norm = {("attn_norm", True): "self_attn_layer_norm", ("mlp_norm", True): "final_layer_norm",
                ("attn_norm", False): "input_layernorm", ("mlp_norm", False): "post_attention_layernorm"}
        return f"{pre}.{norm[(sub[0], opt)]}.{'weight' if sub[1] == 'scale' else 'bias'}", False
    kind = "weight" if sub[-1] == "w" else "bias"
    if sub[0] == "attn":
        proj = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "out_proj" if opt else "o_proj"}[sub[1]]
        return f"{pre}.self_attn.{proj}.{kind}", kind == "weight"
    proj = {"gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj", "fc1": "fc1", "fc2": "fc2"}[sub[1]]
    return f"{pre}.{proj}.{kind}", kind == "weight"


def param_sources(mdef: ModelDef) -> Params:
    cfg, lay = mdef.cfg, mdef.layout

    def one(path, x):
        p = path_names(path)
        name, transpose = _hf_name(cfg, p)
        maps: list[np.ndarray | None] = [None] * x.ndim
        owner = p[-2] if len(p) > 1 else ""
        if owner in ("k", "v"):
            maps[-1] = lay.kv_column_map()
        elif owner in ("gate", "up", "fc1"):
            maps[-1] = lay.intermediate_map()
        elif owner in ("down", "fc2") and p[-1] == "w":
            maps[0] = lay.intermediate_map()
        elif p == ("embed", "w"):
            maps[0] = lay.vocab_map()
        elif p == ("lm_head", "w"):
            maps[1] = lay.vocab_map()
        return ParamSource(name, transpose, tuple(maps))

    return jax.tree_util.tree_map_with_path(one, mdef.abstract)


def _expected_src_shape(ps: ParamSource, global_shape: tuple[int, ...]) -> tuple[int, ...]:
    shp = []
    for d, n in enumerate(global_shape):
        m = ps.maps[d] if d < len(ps.maps) else None
        shp.append(int(m.max()) + 1 if m is not None else n)
    return tuple(reversed(shp)) if ps.transpose else tuple(shp)


def read_block(tensor: np.ndarray, ps: ParamSource, global_shape, index, dtype) -> np.ndarray:
    """The block `index` (tuple of slices over our global layout) of a parameter, as `dtype`."""
    t = tensor.T if ps.transpose else tensor
    sel = []
    for d, n in enumerate(global_shape):
        full = ps.maps[d] if d < len(ps.maps) and ps.maps[d] is not None else np.arange(n)
        sel.append(full[index[d]] if d < len(index) else full)
    out = np.zeros(tuple(len(s) for s in sel), dtype=dtype)
    valid = [s >= 0 for s in sel]
    if not all(v.any() for v in valid):
        return out
    src_idx = [s[v] for s, v in zip(sel, valid)]
    # Read one contiguous range per dim (cheap on a memmap), then pick the rows/columns we need.
    lo = [int(s.min()) for s in src_idx]
    hi = [int(s.max()) + 1 for s in src_idx]
    block = np.asarray(t[tuple(slice(a, b) for a, b in zip(lo, hi))])
    block = block[np.ix_(*[s - a for s, a in zip(src_idx, lo)])]
    out[np.ix_(*[np.nonzero(v)[0] for v in valid])] = block.astype(dtype)
    return out


def load_params(engine: Engine, source: TensorSource, progress: Callable[[str], None] | None = None) -> Params:
    """Read every parameter of `engine.mdef` from `source`, directly into its shards."""
    mdef = engine.mdef
    srcs = param_sources(mdef)
    names = source.names()
    np_dtype = np.dtype(mdef.dtype)
    specs = mdef.specs()
    shardings = engine.shardings()
    cfg = mdef.cfg

    flat_abs = jax.tree_util.tree_flatten_with_path(mdef.abstract)[0]
    out = {}
    for path, abstract in flat_abs:
        p = path_names(path)
        ps = _get(srcs, p)
        name = ps.hf_name
        if name not in names and name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # pragma: no cover  (tied models have no lm_head param)
        if name not in names and name.startswith("model.decoder."):  # old OPT checkpoints: "decoder.*"
            alt = name[len("model."):]
            if alt in names:
                ps = dataclasses.replace(ps, hf_name=alt)
                name = alt
        if name not in names:
            raise WeightLoadError(f"checkpoint has no tensor {name!r} (needed for parameter {'/'.join(map(str, p))})")
        tensor = source.get(name)
        want = _expected_src_shape(ps, abstract.shape)
        if tuple(tensor.shape) != want:
            raise WeightLoadError(f"shape mismatch for {name!r}: checkpoint has {tuple(tensor.shape)}, "
                                  f"the model config expects {want}")
        spec = _get(specs, p)
        gshape = tuple(abstract.shape)
        if progress:
            progress(name)
        if engine.emulate:
            full = read_block(tensor, ps, gshape, tuple(slice(None) for _ in gshape), np_dtype)
            from spd_jax.runtime import stack_shards
            arr = jax.device_put(np.ascontiguousarray(stack_shards(full, spec, mdef.tp)), _get(shardings, p))
        else:
            arr = jax.make_array_from_callback(
                gshape, _get(shardings, p),
                lambda idx, t=tensor, ps=ps, g=gshape: read_block(t, ps, g, idx, np_dtype))
        _set(out, p, arr)
    return out


def _get(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set(tree, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


# ----------------------------------------------------------------------------- model + tokenizer


@dataclasses.dataclass
class LoadedModel:
    cfg: ModelConfig
    hf_config: Any
    source: TensorSource
    tokenizer_factory: Callable[[], Any]
    path: Path

    def tokenizer(self):
        return self.tokenizer_factory()


def open_model(model: str | os.PathLike) -> LoadedModel:
    """Open a HF model directory or a .gguf file (config + lazy tensors + tokenizer factory)."""
    from transformers import AutoConfig, AutoTokenizer

    from spd_jax.embedded import resolve_model_path

    path = resolve_model_path(model)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise WeightLoadError(f"{path}: no config.json (expected a Hugging Face model directory)")
        try:
            hf = AutoConfig.from_pretrained(str(path))
        except Exception as e:
            raise WeightLoadError(f"{path}/config.json could not be read: {e}") from None
        cfg = model_config_from_hf(hf)
        return LoadedModel(cfg, hf, SafetensorsSource(path),
                           lambda: AutoTokenizer.from_pretrained(str(path)), path)
    if path.suffix.lower() == ".gguf":
        from spd_jax import gguf_meta  # config and tokenizer without torch (transformers' GGUF path imports it)

        hf = gguf_meta.hf_config(path)
        cfg = model_config_from_hf(hf)
        return LoadedModel(cfg, hf, GGUFSource(path, cfg), lambda: gguf_meta.tokenizer(path), path)
    raise ConfigError(f"{path}: expected a Hugging Face model directory or a .gguf file")
