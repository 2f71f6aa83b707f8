"""Megatron tensor-parallel layout over a 1-D `tp` mesh axis.

Column-parallel: q/k/v, gate/up (fc1)  -> weight [in, out] split on `out`   P(None, "tp")
Row-parallel:    o, down (fc2)          -> weight [in, out] split on `in`    P("tp", None)
Vocab-parallel:  embedding [V, D] split on V; lm head [D, V] split on V.
Norms, position embeddings and row-parallel biases are replicated (a row-parallel bias is added
once, after the all-reduce).

Padding that keeps the maths exact: the MLP width and the vocabulary are padded up to a multiple of
tp with zero rows/columns (silu(0) * 0 = 0 and relu(0) = 0 contribute nothing; padded vocab logits are
sliced off). KV heads are replicated when tp > n_kv_heads, so each device holds the kv head its
query heads use.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from spd_jax.config import ConfigError, ModelConfig, ceil_to

TP_AXIS = "tp"


def valid_tp_degrees(cfg: ModelConfig, upto: int = 64) -> list[int]:
    out = []
    for n in range(1, upto + 1):
        if cfg.n_heads % n:
            continue
        if cfg.n_kv_heads % n and n % cfg.n_kv_heads:
            continue
        out.append(n)
    return out


@dataclasses.dataclass(frozen=True)
class TPLayout:
    """Global (padded/replicated) sizes for a model split `tp` ways."""

    cfg: ModelConfig
    tp: int

    def __post_init__(self):
        c, n = self.cfg, self.tp
        if n < 1:
            raise ConfigError(f"tp must be >= 1, got {n}")
        if c.n_heads % n or (c.n_kv_heads % n and n % c.n_kv_heads):
            raise ConfigError(
                f"TP degree {n} does not divide the model's {c.n_heads} attention heads "
                f"({c.n_kv_heads} kv heads); valid TP degrees: {valid_tp_degrees(c)}"
            )

    @property
    def kv_heads(self) -> int:
        """Global kv heads after replication (>= tp)."""
        return max(self.cfg.n_kv_heads, self.tp)

    @property
    def kv_repeat(self) -> int:
        return self.kv_heads // self.cfg.n_kv_heads

    @property
    def intermediate(self) -> int:
        return ceil_to(self.cfg.intermediate, self.tp)

    @property
    def vocab(self) -> int:
        return ceil_to(self.cfg.vocab_size, self.tp)

    @property
    def heads_local(self) -> int:
        return self.cfg.n_heads // self.tp

    @property
    def kv_heads_local(self) -> int:
        return self.kv_heads // self.tp

    # Index maps from our global layout to the checkpoint's (-1 = zero padding).
    def kv_column_map(self) -> np.ndarray:
        hd = self.cfg.head_dim
        src_head = np.arange(self.kv_heads) // self.kv_repeat
        return (src_head[:, None] * hd + np.arange(hd)[None, :]).reshape(-1)

    def intermediate_map(self) -> np.ndarray:
        m = np.arange(self.intermediate)
        return np.where(m < self.cfg.intermediate, m, -1)

    def vocab_map(self) -> np.ndarray:
        m = np.arange(self.vocab)
        return np.where(m < self.cfg.vocab_size, m, -1)


COLUMN = P(None, TP_AXIS)
ROW = P(TP_AXIS, None)
SHARDED_VEC = P(TP_AXIS)
REPLICATED = P()


def param_spec(path: tuple[str, ...], ndim: int) -> P:
    """Partition spec of a parameter from its module path (e.g. ('layers', 3, 'attn', 'q', 'w'))."""
    names = [str(p) for p in path]
    leaf, owner = names[-1], names[-2] if len(names) > 1 else ""
    if owner in ("q", "k", "v", "qkv", "gate", "up", "gate_up", "fc1"):
        return COLUMN if leaf == "w" else SHARDED_VEC
    if owner in ("o", "down", "fc2"):
        return ROW if leaf == "w" else REPLICATED
    if owner == "embed":
        return ROW
    if owner == "lm_head":
        return COLUMN
    return REPLICATED


def make_mesh(tp: int, devices=None) -> Mesh:
    devices = list(devices if devices is not None else jax.devices())
    if tp > len(devices):
        raise ConfigError(
            f"tp={tp} needs {tp} devices but only {len(devices)} are visible; on CPU set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={tp}, or use --emulate to run "
            "the N-way TP maths on one device"
        )
    return Mesh(np.array(devices[:tp]), (TP_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def named(mesh: Mesh, spec: P) -> NamedSharding:
    return NamedSharding(mesh, spec)
