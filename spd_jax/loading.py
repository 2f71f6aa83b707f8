"""Load real weights into TP shards: Hugging Face safetensors directories and GGUF files.

Each parameter of our global layout is described by a `ParamSource`: the checkpoint tensor it comes
from, whether it is transposed (HF Linear weights are [out, in], ours [in, out]) and index maps for
padding/replication (-1 = a zero row/column). Arrays are built with `jax.make_array_from_callback`, so
each device's shard is read from the memory-mapped file on its own: no host ever materialises a full
unsharded copy per device, and in a multi-process run each process reads only its devices' shards.

safetensors: read with `np.memmap` + `ml_dtypes` (the `safetensors` package's NumPy backend cannot
represent bfloat16, the dtype of most LLaMA checkpoints). GGUF: `spd_jax.gguf_file` + `gguf.dequantize`,
one tensor at a time; the llama.cpp Q/K RoPE permutation is undone as transformers does.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any, Callable

import jax
import ml_dtypes
import numpy as np
from jax.sharding import PartitionSpec as P

from spd_jax.arch import ParamInfo
from spd_jax.config import ConfigError, ModelConfig, WeightLoadError, model_config_from_hf  # noqa: F401 (re-exported)
from spd_jax.runtime import Engine, ModelDef, Params, path_names
from spd_jax.sharding import named


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
        if not isinstance(header, dict):
            raise WeightLoadError(f"{path}: not a valid safetensors file (its header is a JSON "
                                  f"{type(header).__name__}, not an object of tensors)")
        header.pop("__metadata__", None)
        self.base = 8 + n
        for name, info in header.items():
            try:
                begin, end = (int(x) for x in info["data_offsets"])
                dtype, shape = info["dtype"], [int(d) for d in info["shape"]]
            except (KeyError, TypeError, ValueError) as e:
                raise WeightLoadError(f"{path}: not a valid safetensors file (damaged header entry for tensor "
                                      f"{name!r}: {type(e).__name__}: {e})") from None
            if dtype not in _ST_DTYPES:
                raise WeightLoadError(f"{path}: tensor {name!r} has unsupported dtype {dtype}")
            if begin < 0 or end - begin != int(np.prod(shape)) * np.dtype(_ST_DTYPES[dtype]).itemsize:
                raise WeightLoadError(f"{path}: not a valid safetensors file (tensor {name!r}: byte range "
                                      f"{begin}..{end} does not hold a {dtype} array of shape {shape})")
            if self.base + end > size:
                raise WeightLoadError(f"{path}: tensor {name!r} ends at byte {self.base + end} but the file has "
                                      f"{size} bytes (truncated download?)")
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

    naming = "hf"  # which checkpoint name of a parameter (arch.ParamInfo.hf / .gguf) this source answers to

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


def unpermute_rope(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (convert_hf_to_gguf.py `permute`)."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


class GGUFSource(TensorSource):
    """Dequantised tensors of a GGUF file, under their GGUF names (each parameter declares its GGUF name;
    `arch.ParamInfo.gguf`). Shapes come back in the Hugging Face orientation ([out, in])."""

    naming = "gguf"

    def __init__(self, path: Path, cfg: ModelConfig):
        import gguf

        from spd_jax.gguf_file import read_gguf

        try:
            self.tensors = read_gguf(path).tensors
        except Exception as e:  # truncated or foreign files fail in assorted ways
            raise WeightLoadError(f"{path}: not a readable GGUF file: {type(e).__name__}: {e}") from None
        self._dequantize = gguf.dequantize
        self.cfg = cfg
        self._cache: tuple[str, np.ndarray] | None = None

    def names(self):
        return set(self.tensors)

    def get(self, name):
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        t = self.tensors[name]
        w = np.asarray(self._dequantize(t.data, t.tensor_type), dtype=np.float32)
        w = w.reshape(tuple(int(x) for x in reversed(t.shape)))  # ggml ne is [in, out]: reverse
        self._cache = (name, w)  # shards of one tensor are read one after another
        return w


# ----------------------------------------------------------------------------- our layout <- checkpoint names


@dataclasses.dataclass(frozen=True)
class ParamSource:
    name: str  # tensor name in the source (HF or GGUF naming)
    transpose: bool = False
    maps: tuple[np.ndarray | None, ...] = ()  # per global dim: index into the (transposed) tensor, -1 = 0
    rope_heads: int | None = None  # GGUF: undo llama.cpp's RoPE row permutation over this many heads

    def __hash__(self):
        return hash(self.name)


def param_sources(mdef: ModelDef, naming: str = "hf") -> Params:
    """Where each parameter comes from, read off its declared layout (arch.ParamInfo): name, orientation,
    and the padding/replication map of each logical axis."""
    cfg, lay = mdef.cfg, mdef.layout

    def one(info: ParamInfo):
        name = info.hf if naming == "hf" else info.gguf
        if name is None:
            what = "a checkpoint tensor" if not info.fused_from else "a checkpoint tensor (fused layout)"
            raise WeightLoadError(f"a parameter with axes {info.axes} has no {naming} name: it is not {what}"
                                  + ("" if naming == "hf" else f"; {cfg.arch} has no GGUF form"))
        rope = None
        if naming == "gguf" and info.gguf_rope is not None:
            rope = cfg.n_heads if info.gguf_rope == "q" else cfg.n_kv_heads
        return ParamSource(name, info.transpose, tuple(lay.pad_map(a) for a in info.axes), rope)

    return jax.tree.map(one, mdef.infos, is_leaf=lambda x: isinstance(x, ParamInfo))


def _expected_src_shape(ps: ParamSource, global_shape: tuple[int, ...]) -> tuple[int, ...]:
    shp = []
    for d, n in enumerate(global_shape):
        m = ps.maps[d] if d < len(ps.maps) else None
        shp.append(int(m.max()) + 1 if m is not None else n)
    return tuple(reversed(shp)) if ps.transpose else tuple(shp)


def _as_slice(ix: np.ndarray) -> slice | None:
    """ix as a slice if it is a non-empty run of consecutive indices, else None."""
    if len(ix) == 0 or int(ix[-1]) - int(ix[0]) + 1 != len(ix) or (len(ix) > 1 and not (np.diff(ix) == 1).all()):
        return None
    return slice(int(ix[0]), int(ix[-1]) + 1)


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
    src_sl = [_as_slice(s) for s in src_idx]
    dst_sl = [_as_slice(np.nonzero(v)[0]) for v in valid]
    if all(x is not None for x in src_sl + dst_sl):  # the common case: a plain sub-block, no gather needed
        # Copy the block out of the file in the file's own (row-major) order, then transpose in memory: reading
        # a transposed memory-mapped view element by element (or gathering from it) was 10-25x slower.
        block = np.array(tensor[tuple(reversed(src_sl))] if ps.transpose else t[tuple(src_sl)])
        out[tuple(dst_sl)] = block.T if ps.transpose else block
        return out
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
    if mdef.fused or mdef.norms_folded:
        raise WeightLoadError("load weights into the unfused, unfolded model, then runtime.fuse_projections / "
                              "runtime.fold_norms")
    srcs = param_sources(mdef, getattr(source, "naming", "hf"))
    names = source.names()
    np_dtype = np.dtype(mdef.dtype)
    specs = mdef.specs()
    shardings = engine.shardings()

    flat_abs = jax.tree_util.tree_flatten_with_path(mdef.abstract)[0]
    out = {}
    for path, abstract in flat_abs:
        p = path_names(path)
        ps = _get(srcs, p)
        name = ps.name
        if name not in names and name.startswith("model.decoder."):  # old OPT checkpoints: "decoder.*"
            alt = name[len("model."):]
            if alt in names:
                ps = dataclasses.replace(ps, name=alt)
                name = alt
        if name not in names:
            raise WeightLoadError(f"checkpoint has no tensor {name!r} (needed for parameter {'/'.join(map(str, p))})")
        tensor = source.get(name)
        if ps.rope_heads is not None:
            tensor = unpermute_rope(np.asarray(tensor), ps.rope_heads)
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
        elif ps.transpose and len(gshape) == 2 and _identity_maps(ps, gshape):
            # A plain [out, in] checkpoint tensor: each device's block is read in the file's orientation (a
            # contiguous copy) and transposed on the device; a host-side transpose of bf16 ran at ~100 MB/s.
            sh = _get(shardings, p)
            src = jax.make_array_from_callback(
                gshape[::-1], named(engine.mesh, P(*reversed(tuple(spec) + (None,) * (2 - len(spec))))),
                lambda idx, t=tensor: np.asarray(t[idx], dtype=np_dtype))
            arr = _transpose_to(sh)(src)
        else:
            arr = jax.make_array_from_callback(
                gshape, _get(shardings, p),
                lambda idx, t=tensor, ps=ps, g=gshape: read_block(t, ps, g, idx, np_dtype))
        _set(out, p, arr)
    return out


def _identity_maps(ps: ParamSource, gshape) -> bool:
    """No padding or replication: our global array is the checkpoint tensor itself (up to orientation)."""
    return all(d >= len(ps.maps) or ps.maps[d] is None
               or (len(ps.maps[d]) == n and bool((ps.maps[d] == np.arange(n)).all())) for d, n in enumerate(gshape))


@functools.lru_cache(maxsize=None)
def _transpose_to(sharding):
    """A jitted 2-D transpose into `sharding` (per device: its own block, no communication). Donated input."""
    return jax.jit(lambda x: x.T, out_shardings=sharding, donate_argnums=0)


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


def _hf_tokenizer(path: Path):
    """The tokenizer saved in a model directory; a folder without one is a WeightLoadError naming what is missing."""
    from transformers import AutoTokenizer

    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise WeightLoadError(f"{path}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json + "
                              f"merges.txt): copy the model's tokenizer into the folder")
    try:
        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:  # noqa: BLE001 - transformers raises assorted errors for missing or damaged files
        raise WeightLoadError(f"{path}: its tokenizer could not be loaded: {type(e).__name__}: "
                              f"{' '.join(str(e).split())[:300]}") from None


def open_model(model: str | os.PathLike) -> LoadedModel:
    """Open a HF model directory or a .gguf file (config + lazy tensors + tokenizer factory)."""
    from spd_jax.embedded import resolve_model_path

    path = resolve_model_path(model)
    if path.is_dir():
        from transformers import AutoConfig  # imports torch where installed (~3 s): HF folders only

        if not (path / "config.json").is_file():
            raise WeightLoadError(f"{path}: no config.json (expected a Hugging Face model directory)")
        try:
            hf = AutoConfig.from_pretrained(str(path))
        except Exception as e:
            raise WeightLoadError(f"{path}/config.json could not be read: {e}") from None
        cfg = model_config_from_hf(hf)
        return LoadedModel(cfg, hf, SafetensorsSource(path), lambda: _hf_tokenizer(path), path)
    if path.suffix.lower() == ".gguf":
        from spd_jax import gguf_meta  # config and tokenizer without torch (transformers' GGUF path imports it)

        hf = gguf_meta.hf_config(path)
        cfg = model_config_from_hf(hf)
        return LoadedModel(cfg, hf, GGUFSource(path, cfg), lambda: gguf_meta.tokenizer(path), path)
    raise ConfigError(f"{path}: expected a Hugging Face model directory or a .gguf file")


def open_engine(settings, check: Callable[[ModelConfig], None] | None = None) -> tuple[LoadedModel, Engine]:
    """The model of `settings` (a `config.ModelSettings`: model, tp, dtype, emulate) opened, and the engine that
    runs it; `check` sees the model's config before anything is built (bad input fails in seconds)."""
    from spd_jax.runtime import build_model_def

    loaded = open_model(settings.model)
    if check is not None:
        check(loaded.cfg)
    return loaded, Engine.create(build_model_def(loaded.cfg, settings.tp, settings.dtype), emulate=settings.emulate)


def load_weights(engine: Engine, loaded: LoadedModel, verbose: bool = False) -> Params:
    """`load_params` of the opened model; verbose: a progress bar and a summary line on stderr."""
    from tqdm.auto import tqdm

    mdef = engine.mdef
    n = len(jax.tree.leaves(mdef.abstract))
    t0 = time.time()
    with tqdm(total=n, desc="loading weights", unit="tensor", file=sys.stderr, leave=False, disable=not verbose) as bar:
        params = load_params(engine, loaded.source, progress=lambda name: bar.update(1))
    if verbose:
        nbytes = sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(mdef.abstract))
        print(f"loaded {n} tensors ({nbytes / 2**20:.0f} MiB as {mdef.dtype}) from {loaded.path.name} in "
              f"{time.time() - t0:.1f} s", file=sys.stderr)
    return params
