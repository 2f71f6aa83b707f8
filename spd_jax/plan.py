"""Which blocks drop their attention sync point: the `SyncPlan` value, and the plan file (`plan.json`).

`SyncPlan` is the one carrier of the per-block sync setting: a mode per block ("sync": two
all-reduces; "spd": one, the attention partial stays local; "none": no all-reduce at all, the
benchmark's compute-only floor, numerically meaningless) and the bias policy of the SPD MLP input
(docs/design.md). It is hashable and passed as one static argument to the model; its constructors are
the only place a per-block setting is built.

Written by the SPD pipeline (`launch/train_distill.py`), read by `launch/infer.py --spd-plan`.
Format (version 1):
    {"version": 1, "model": "...", "tp": 3, "n_layers": 30,
     "blocks": [{"index": 0, "mode": "sync"|"spd", "sensitivity": float|null,
                 "class": "ISB"|"SB"|"ESB"|null, "treatment": "ZS"|"ZS+B2B"|"ZS+HG+B2B"|null}, ...],
     ...extra fields (data, thresholds, ratio) are kept as written}
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

from spd_jax.collectives import PSUM, AllReduce
from spd_jax.config import (ATTENTION_KERNELS, SHADOW_ALLREDUCE, ConfigError, GenerationConfig, parse_block_spec,
                             parse_kernel_tune)

PLAN_VERSION = 1
MODES = ("sync", "spd", "none")


@dataclasses.dataclass(frozen=True)
class DecodePath:
    """How a decode step executes, beside the `SyncPlan` that says which all-reduces run: one hashable value,
    a static argument of the compiled step (so two paths never share a compiled program).

    attention: "xla" (masked attention in plain JAX) or "pallas" (the decode-attention kernel, which also
    writes the step's k/v into the cache; `kernels.decode_attention_append`). shadow_row: batch-1 decode runs
    the blocks on two identical rows (model.Transformer). shadow_allreduce: those rows' all-reduces carry the
    first row ("first") or both. tune: the kernel's Triton settings, sorted (key, value) pairs; () = its
    defaults. The model's weight layout (fused projections, folded norms) is not here: it is the params'."""

    attention: str = "xla"
    shadow_row: bool = False
    shadow_allreduce: str = "first"
    tune: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        if self.shadow_allreduce not in SHADOW_ALLREDUCE:
            raise ValueError(f"shadow_allreduce must be one of {SHADOW_ALLREDUCE}, got {self.shadow_allreduce!r}")

    @classmethod
    def of(cls, gen: GenerationConfig, attention: str) -> "DecodePath":
        """The path of a generation config, its "auto" attention already resolved (`attention`)."""
        return cls(attention, gen.shadow_row, gen.shadow_allreduce, parse_kernel_tune(gen.attention_tune))


@dataclasses.dataclass(frozen=True)
class SyncPlan:
    """Per-block sync modes plus the SPD bias policy ("full": the row-parallel o bias is in the SPD MLP
    input; "none": it is not, see docs/design.md) and how the all-reduces that remain are done
    (`collectives.AllReduce`: NCCL's psum, or a one-shot exchange for small messages). Build with the
    constructors below; `using(allreduce)` swaps the all-reduce implementation."""

    modes: tuple[str, ...]
    bias: Literal["full", "none"] = "full"
    allreduce: AllReduce = PSUM

    def __post_init__(self):
        object.__setattr__(self, "modes", tuple(self.modes))
        bad = sorted({m for m in self.modes if m not in MODES})
        if bad:
            raise ConfigError(f"sync plan: unknown block mode(s) {bad} (allowed: {', '.join(MODES)})")
        if self.bias not in ("full", "none"):
            raise ConfigError(f"sync plan: bias must be 'full' or 'none', got {self.bias!r}")
        if "none" in self.modes and set(self.modes) != {"none"}:
            raise ConfigError("sync plan: 'none' (no collectives) is all-or-nothing: the benchmark's floor")

    # ---- constructors
    @classmethod
    def sync(cls, n_layers: int, bias: str = "full") -> "SyncPlan":
        return cls(("sync",) * n_layers, bias)

    @classmethod
    def all_spd(cls, n_layers: int, bias: str = "full") -> "SyncPlan":
        return cls(("spd",) * n_layers, bias)

    @classmethod
    def floor(cls, n_layers: int) -> "SyncPlan":
        """No all-reduce anywhere (the benchmark's compute-only lower bound; wrong numbers by design)."""
        return cls(("none",) * n_layers)

    @classmethod
    def from_flags(cls, spd: Iterable[bool], bias: str = "full") -> "SyncPlan":
        return cls(tuple("spd" if f else "sync" for f in spd), bias)

    @classmethod
    def from_blocks(cls, blocks: Iterable[int], n_layers: int, bias: str = "full") -> "SyncPlan":
        chosen = set(int(i) for i in blocks)
        bad = sorted(i for i in chosen if not 0 <= i < n_layers)
        if bad:
            raise ConfigError(f"block index(es) {bad} out of range: the model has blocks 0..{n_layers - 1}")
        return cls.from_flags((i in chosen for i in range(n_layers)), bias)

    @classmethod
    def from_spec(cls, spec: str | None, n_layers: int, bias: str = "full") -> "SyncPlan":
        """"all" / "none" / "0,2,5-9" (the blocks in SPD mode)."""
        return cls.from_flags(parse_block_spec(spec, n_layers), bias)

    @classmethod
    def from_ratio(cls, n_layers: int, ratio: float, bias: str = "full") -> "SyncPlan":
        """SPD on round(ratio * L) blocks, the last ones (the benchmark's model-agnostic choice)."""
        if not 0 <= ratio <= 1:
            raise ConfigError(f"SPD ratio must be in [0, 1], got {ratio}")
        n = int(round(ratio * n_layers))
        return cls.from_flags((i >= n_layers - n for i in range(n_layers)), bias)

    @classmethod
    def from_order(cls, order: Sequence[int], count: int, n_layers: int, bias: str = "full") -> "SyncPlan":
        """SPD on the first `count` blocks of `order` (e.g. least sensitive first, Algorithm 1)."""
        return cls.from_blocks(list(order)[:count], n_layers, bias)

    @classmethod
    def from_plan(cls, plan: dict, n_layers: int, bias: str = "full", where: str = "plan") -> "SyncPlan":
        return cls.from_flags(modes_from_plan(plan, n_layers, where), bias)

    # ---- queries
    @property
    def n_layers(self) -> int:
        return len(self.modes)

    def is_spd(self, i: int) -> bool:
        return self.modes[i] == "spd"

    @property
    def spd_blocks(self) -> list[int]:
        return [i for i, m in enumerate(self.modes) if m == "spd"]

    @property
    def n_spd(self) -> int:
        return len(self.spd_blocks)

    @property
    def any_spd(self) -> bool:
        return self.n_spd > 0

    @property
    def collective_free(self) -> bool:
        """The floor plan: no all-reduce at all (also not in the embedding)."""
        return bool(self.modes) and all(m == "none" for m in self.modes)

    @property
    def block_allreduces(self) -> int:
        """All-reduces the decoder blocks issue per forward: 2 per sync block, 1 per SPD block."""
        return sum({"sync": 2, "spd": 1, "none": 0}[m] for m in self.modes)

    def first_spd(self) -> int:
        """The first SPD block (L when none): blocks before it compute as the all-sync model."""
        return next((i for i, m in enumerate(self.modes) if m == "spd"), self.n_layers)

    def using(self, allreduce: AllReduce) -> "SyncPlan":
        """The same plan with another all-reduce implementation."""
        return dataclasses.replace(self, allreduce=allreduce)

    def check(self, n_layers: int) -> "SyncPlan":
        if self.n_layers != n_layers:
            raise ConfigError(f"sync plan has {self.n_layers} blocks, the model has {n_layers}")
        return self


def plan_from_modes(spd_modes: tuple[bool, ...], **extra: Any) -> dict:
    return {"version": PLAN_VERSION, "n_layers": len(spd_modes),
            "blocks": [{"index": i, "mode": "spd" if m else "sync"} for i, m in enumerate(spd_modes)], **extra}


def save_plan(plan: dict, path: str | Path) -> None:
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(plan, indent=2))
    tmp.replace(path)


def load_plan(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"SPD plan not found: {p}")
    try:
        plan = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"SPD plan {p} is not valid JSON: {e}") from None
    if not isinstance(plan, dict) or not isinstance(plan.get("blocks"), list):
        raise ConfigError(f"SPD plan {p} has no 'blocks' list (expected {{\"blocks\": [{{\"index\": 0, "
                          f"\"mode\": \"sync\"|\"spd\"}}, ...]}})")
    return plan


def modes_from_plan(plan: dict, n_layers: int, where: str = "plan") -> tuple[bool, ...]:
    """Per-block SPD flags from a plan that lists every block exactly once."""
    blocks = plan.get("blocks")
    if not isinstance(blocks, list) or not all(isinstance(b, dict) for b in blocks):
        raise ConfigError(f"{where}: 'blocks' must be a list of {{\"index\": int, \"mode\": \"sync\"|\"spd\"}}")
    n_plan = plan.get("n_layers", len(blocks))
    if n_plan != n_layers:
        raise ConfigError(f"{where} is for a model with {n_plan} blocks, this model has {n_layers}")
    modes: list[bool | None] = [None] * n_layers
    for b in blocks:
        i, mode = b.get("index"), b.get("mode")
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < n_layers:
            raise ConfigError(f"{where}: bad block index {i!r} (the model has blocks 0..{n_layers - 1})")
        if mode not in ("sync", "spd"):
            raise ConfigError(f"{where}: block {i} has mode {mode!r} (expected 'sync' or 'spd')")
        if modes[i] is not None:
            raise ConfigError(f"{where}: block {i} is listed more than once")
        modes[i] = mode == "spd"
    missing = [i for i, m in enumerate(modes) if m is None]
    if missing:
        raise ConfigError(f"{where}: block(s) {missing} are not listed (a plan lists every block once)")
    return tuple(bool(m) for m in modes)
