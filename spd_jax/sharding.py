"""Megatron tensor-parallel layout over a 1-D `tp` mesh axis, from each parameter's logical axes.

Every parameter declares logical axes (`spd_jax.arch.ParamInfo`, set where the model creates it); the
axes q_heads / kv_heads / ffn / vocab / fused are split over `tp`, the rest replicated:
Column-parallel: q/k/v, gate/up (fc1)  -> weight [embed, heads|ffn] split on `out`   P(None, "tp")
Row-parallel:    o, down (fc2)          -> weight [heads|ffn, embed] split on `in`    P("tp", None)
Vocab-parallel:  embedding [vocab, embed]; lm head [embed, vocab].
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
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from spd_jax.arch import LOGICAL_AXES, ParamInfo
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

    def pad_map(self, axis: str) -> np.ndarray | None:
        """Index map of a logical axis into the checkpoint's (-1 = zero padding); None = identity."""
        rule = LOGICAL_AXES[axis][1]
        return {"kv": self.kv_column_map, "ffn": self.intermediate_map, "vocab": self.vocab_map}[rule]() \
            if rule else None


REPLICATED = P()


def spec_of(info: ParamInfo) -> P:
    """PartitionSpec of a parameter from its declared logical axes."""
    d = info.tp_dim()
    if d is None:
        return REPLICATED
    return P(*[TP_AXIS if i == d else None for i in range(len(info.axes))])


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
