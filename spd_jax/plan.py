"""The SPD plan file (`plan.json`): which blocks drop their attention sync point, and why.

Written by the SPD pipeline (`launch/train_distill.py`), read by `launch/infer.py --spd-plan`.
Format (version 1):
    {"version": 1, "model": "...", "tp": 3, "n_layers": 30,
     "blocks": [{"index": 0, "mode": "sync"|"spd", "sensitivity": float|null,
                 "class": "ISB"|"SB"|"ESB"|null, "treatment": "ZS"|"ZS+B2B"|"ZS+HG+B2B"|null}, ...],
     ...extra fields (data, thresholds, ratio) are kept as written}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spd_jax.config import ConfigError

PLAN_VERSION = 1


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
