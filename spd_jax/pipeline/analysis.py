"""Sync sensitivity (Algorithm 1), block classes ISB/SB/ESB, and choosing which blocks to drop.

Algorithm 1 (`cumulative`, the paper's): dropping from the last block backwards,
    s_i = PPL(SPD on blocks i..L-1) - PPL(SPD on blocks i+1..L-1)
with blocks before i in sync mode. Option `isolated`: s_i = PPL(SPD on block i alone) - PPL(no SPD).
Both reuse the cached teacher hidden state entering block i, so each evaluation runs only blocks i..L-1.

Classes, with thresholds tau1 < tau2 on s_i:
    ISB  s_i <= tau1          -> ZS          (zero-shot drop)
    SB   tau1 < s_i <= tau2   -> ZS+B2B      (+ block-to-block distillation)
    ESB  s_i > tau2           -> ZS+HG+B2B   (+ head grouping first)
The paper publishes no thresholds. Default rule (documented in docs/spd_pipeline.md): relative to the
calibration perplexity of the unmodified model, tau1 = 0.5% and tau2 = 2% of it. Absolute values can be
given instead.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import numpy as np
from tqdm.auto import tqdm

from spd_jax.config import ConfigError

TREATMENT = {"ISB": "ZS", "SB": "ZS+B2B", "ESB": "ZS+HG+B2B"}


@dataclasses.dataclass
class Sensitivity:
    method: str
    base_ppl: float
    s: list[float]  # per block
    ppl_curve: list[float]  # cumulative: PPL(SPD on i..L-1); isolated: PPL(SPD on i)


def sensitivity(ops, params, hidden: np.ndarray, tokens: np.ndarray,
                method: Literal["cumulative", "isolated"] = "cumulative", progress: bool = True,
                log: Callable[[str], None] | None = None) -> Sensitivity:
    """`progress`: a progress bar; `log`: one line per block with the elapsed time and an ETA (for logs)."""
    import time

    L = ops.n_layers
    t0 = time.time()
    base = float(np.exp(ops.suffix_nll(params, hidden[L], tokens, L, ops.plan([]))))
    curve = [0.0] * L
    bar = tqdm(range(L - 1, -1, -1), desc=f"sensitivity ({method})", disable=not progress, unit="block")
    work_done, work_all = 0, sum(L - i for i in range(L))  # blocks run: the suffix from i has L - i
    for i in bar:
        plan = ops.plan(range(i, L) if method == "cumulative" else [i])
        curve[i] = float(np.exp(ops.suffix_nll(params, hidden[i], tokens, i, plan)))
        bar.set_postfix(ppl=f"{curve[i]:.2f}")
        work_done += L - i
        if log is not None:
            el = time.time() - t0
            log(f"[sensitivity] block {i}: PPL {curve[i]:.4g} ({L - i}/{L} blocks, {el:.0f} s, "
                f"ETA {el / work_done * (work_all - work_done):.0f} s)")
    if method == "cumulative":
        s = [curve[i] - (curve[i + 1] if i + 1 < L else base) for i in range(L)]
    elif method == "isolated":
        s = [c - base for c in curve]
    else:
        raise ConfigError(f"unknown sensitivity method {method!r} (cumulative | isolated)")
    return Sensitivity(method, base, s, curve)


def thresholds(base_ppl: float, tau1: float | None, tau2: float | None, tau1_rel: float, tau2_rel: float):
    """(tau1, tau2): the absolute pair if given, else the relative pair times the calibration perplexity
    (PipelineConfig.validate has checked the pair: both or neither, in order)."""
    return (tau1, tau2) if tau1 is not None else (tau1_rel * base_ppl, tau2_rel * base_ppl)


def classify(s: list[float], tau1: float, tau2: float) -> list[str]:
    """ISB / SB / ESB per block for thresholds tau1 < tau2."""
    return ["ISB" if v <= tau1 else "SB" if v <= tau2 else "ESB" for v in s]


def order_by_sensitivity(s: list[float]) -> list[int]:
    """Blocks from least to most sensitive (ties: later block first, as Algorithm 1 drops backwards)."""
    return sorted(range(len(s)), key=lambda i: (s[i], -i))


def select_by_ratio(s: list[float], ratio: float) -> list[int]:
    if not 0.0 <= ratio <= 1.0:
        raise ConfigError(f"SPD ratio must be in [0, 1], got {ratio}")
    n = int(round(ratio * len(s)))
    return sorted(order_by_sensitivity(s)[:n])


def select_by_budget(s: list[float], base_ppl: float, max_increase_pct: float,
                     ppl_of: Callable[[list[int]], float]) -> tuple[list[int], list[tuple[int, float]]]:
    """Largest n whose zero-shot SPD on the n least sensitive blocks keeps calibration PPL within
    base * (1 + pct/100). Binary search over n (perplexity grows with n in practice); returns the chosen
    blocks and every (n, ppl) evaluated."""
    if max_increase_pct < 0:
        raise ConfigError(f"--max-ppl-increase must be >= 0, got {max_increase_pct}")
    order = order_by_sensitivity(s)
    limit = base_ppl * (1 + max_increase_pct / 100.0)
    tried: list[tuple[int, float]] = []
    lo, hi = 0, len(s)  # invariant: n=lo is within budget
    while lo < hi:
        mid = (lo + hi + 1) // 2
        p = ppl_of(sorted(order[:mid]))
        tried.append((mid, p))
        if p <= limit:
            lo = mid
        else:
            hi = mid - 1
    return sorted(order[:lo]), tried
