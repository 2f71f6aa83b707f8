"""A GGUF file's header and tensors, parsed once per process.

llama.cpp's `gguf.GGUFReader` builds a NumPy view for every item of every metadata array, which for a
tokenizer of 49 152 tokens takes 3-8 s per open on a 2-core machine (3.1 s timed alone, 8.3 s inside a profiled
command; this parser: 0.17 s), and the config and the weights each opened the
file with it. This parser reads the header with `struct` from one memory map (the format:
https://github.com/ggml-org/ggml/blob/master/docs/gguf.md) and returns what the reader's `fields[...].contents()`
and `tensors` give, in a fraction of a second; dequantisation stays `gguf.dequantize`. Tested against
`GGUFReader` on the embedded model and on files written by `gguf.GGUFWriter`.
"""

from __future__ import annotations

import dataclasses
import functools
import mmap
import os
import struct
from pathlib import Path
from typing import Any

import numpy as np

MAGIC = b"GGUF"
# GGUF value types -> struct format of one scalar
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9
# ggml tensor types stored as plain NumPy items (the others are quantised blocks, read as bytes)
_PLAIN = {0: np.float32, 1: np.float16, 24: np.int8, 25: np.int16, 26: np.int32, 27: np.int64, 28: np.float64}


@dataclasses.dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order (ne: innermost first), as GGUFReader's `shape`
    tensor_type: Any  # gguf.GGMLQuantizationType
    data: np.ndarray  # as GGUFReader's `data`: plain items in reversed shape, or the blocks' bytes per row


@dataclasses.dataclass(frozen=True)
class GGUFFile:
    path: str
    version: int
    meta: dict[str, Any]  # key -> value (str, number, bool or list), as `field.contents()`
    tensors: dict[str, GGUFTensor]


class _Cursor:
    def __init__(self, buf, little: bool = True):
        self.buf, self.pos, self.end = buf, 0, "<" if little else ">"

    def take(self, fmt: str):
        s = struct.Struct(self.end + fmt)
        v = s.unpack_from(self.buf, self.pos)
        self.pos += s.size
        return v[0] if len(v) == 1 else v

    def string(self) -> str:
        n = self.take("Q")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int):
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            itype, n = self.take("I"), self.take("Q")
            if itype == _STRING:
                return [self.string() for _ in range(n)]
            if itype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
            fmt = _SCALARS[itype]
            s = struct.Struct(f"{self.end}{n}{fmt}")
            out = list(s.unpack_from(self.buf, self.pos))
            self.pos += s.size
            return out
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF value type {vtype}")
        return self.take(_SCALARS[vtype])


def _parse(path: str) -> GGUFFile:
    import gguf

    with open(path, "rb") as f:
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    if bytes(buf[:4]) != MAGIC:
        raise ValueError(f"not a GGUF file (magic {bytes(buf[:4])!r})")
    little = struct.unpack_from("<I", buf, 4)[0] < 0x10000  # a big-endian file's version reads huge
    c = _Cursor(buf, little)
    c.pos = 4
    version, n_tensors, n_kv = c.take("I"), c.take("Q"), c.take("Q")
    if version < 2:
        raise ValueError(f"GGUF version {version} is not supported (2 or later)")
    meta: dict[str, Any] = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.take("I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        ndim = c.take("I")
        dims = tuple(c.take("Q") for _ in range(ndim))
        infos.append((name, dims, c.take("I"), c.take("Q")))
    align = int(meta.get("general.alignment", 32))
    start = -(-c.pos // align) * align
    order = "<" if little else ">"
    tensors = {}
    for name, dims, raw_type, offset in infos:
        if name in tensors:
            raise ValueError(f"duplicated tensor {name!r}")
        qtype = gguf.GGMLQuantizationType(raw_type)
        np_dims = tuple(reversed(dims))
        n_elems = int(np.prod(dims, dtype=np.int64))
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
        if raw_type in _PLAIN:
            dtype, count = np.dtype(_PLAIN[raw_type]).newbyteorder(order), n_elems
        else:
            dtype, count = np.dtype(np.uint8), n_elems * type_size // block
            np_dims = gguf.quant_shape_to_byte_shape(np_dims, qtype)
        data = np.memmap(path, dtype=dtype, mode="r", offset=start + offset, shape=(count,)).reshape(np_dims)
        tensors[name] = GGUFTensor(name, dims, qtype, data)
    return GGUFFile(path, version, meta, tensors)


@functools.lru_cache(maxsize=4)
def _cached(path: str, mtime_ns: int, size: int) -> GGUFFile:
    return _parse(path)


def read_gguf(path: str | Path) -> GGUFFile:
    """The parsed file, shared by every caller in this process until the file changes (mtime or size)."""
    p = os.fspath(path)
    st = os.stat(p)
    return _cached(p, st.st_mtime_ns, st.st_size)
