"""The latency a plan buys, read from a benchmark of the target hardware.

`spd-bench --shape S --tp N --spd-ratios 0,0.25,0.5,0.75,1 --json bench.json` (or `--spd-plan plan.json`) times
decode with SPD on a number of blocks beside the run with every sync point kept, on the devices and link it ran
on. Each dropped sync point removes one all-reduce of the same message (every block has the same shapes), so the
latency depends on how many blocks drop theirs, not which: a plan dropping k blocks is read off the benchmark
row with k dropped blocks, or interpolated linearly between the two rows around k. NCCL's psum rows are used.
"""

from __future__ import annotations

import json
from pathlib import Path

from spd_jax.config import ConfigError


def _psum_rows(bench: dict) -> list[dict]:
    """The rows timed with NCCL's psum (the default all-reduce), the floor row left out, by dropped blocks."""
    return sorted((r for r in bench["rows"] if r.get("allreduce_method", "psum") == "psum" and r["label"] != "floor"),
                  key=lambda r: r["n_spd"])


def read_bench(path: str | Path, n_layers: int, tp: int) -> dict:
    """A `spd-bench --json` result, checked to be of a shape with `n_layers` blocks at TP `tp` (else a ConfigError
    that says what it holds)."""
    from spd_jax.bench import shape_config

    p = Path(path).expanduser()
    try:
        bench = json.loads(p.read_text())
        shape, bench_tp, psum = bench["shape"], bench["tp"], _psum_rows(bench)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"--latency-from {p}: not a readable spd-bench --json result ({type(e).__name__}: {e})") from None
    blocks = shape_config(shape).n_layers
    if (blocks, bench_tp) != (n_layers, tp):
        raise ConfigError(f"--latency-from {p}: measured on {shape} ({blocks} blocks) at TP {bench_tp}; this model has "
                          f"{n_layers} blocks at TP {tp}: benchmark the same shape and TP degree")
    if not any(r["n_spd"] == 0 for r in psum):
        raise ConfigError(f"--latency-from {p}: no row with every sync point kept (r=0.00) to compare with")
    return {**bench, "source": str(p)}


def expected_latency(bench: dict, n_spd: int) -> dict:
    """The request (e2e) and per-token (decode) latency of a plan dropping `n_spd` sync points, against the
    benchmark's run with every sync point kept: a measured row with that many dropped blocks, or the linear
    interpolation between the two rows around it."""
    rows = _psum_rows(bench)
    sync = next(r for r in rows if r["n_spd"] == 0)
    exact = next((r for r in rows if r["n_spd"] == n_spd), None)
    if exact is not None:
        e2e, tpot, how = exact["e2e_ms"], exact["tpot_ms"], f"measured row {exact['label']}"
    else:
        lo = max((r for r in rows if r["n_spd"] < n_spd), key=lambda r: r["n_spd"], default=None)
        hi = min((r for r in rows if r["n_spd"] > n_spd), key=lambda r: r["n_spd"], default=None)
        if lo is None or hi is None:
            raise ConfigError(f"--latency-from {bench['source']}: no rows around {n_spd} dropped blocks (measured: "
                              f"{sorted({r['n_spd'] for r in rows})}); benchmark ratios up to 1")
        w = (n_spd - lo["n_spd"]) / (hi["n_spd"] - lo["n_spd"])
        e2e = lo["e2e_ms"] + w * (hi["e2e_ms"] - lo["e2e_ms"])
        tpot = lo["tpot_ms"] + w * (hi["tpot_ms"] - lo["tpot_ms"])
        how = (f"interpolated between rows {lo['label']} ({lo['n_spd']} blocks) and {hi['label']} "
               f"({hi['n_spd']} blocks)")
    return {"source": bench["source"], "shape": bench["shape"], "tp": bench["tp"], "device": bench.get("device"),
            "n_devices": bench.get("n_devices"), "n_processes": bench.get("n_processes"),
            "interconnect": bench.get("interconnect"), "n_spd": n_spd, "how": how,
            "sync_e2e_ms": sync["e2e_ms"], "e2e_ms": e2e, "e2e_cut": 1 - e2e / sync["e2e_ms"],
            "sync_tpot_ms": sync["tpot_ms"], "tpot_ms": tpot, "tpot_cut": 1 - tpot / sync["tpot_ms"]}


def describe(lat: dict) -> str:
    return (f"SPD on {lat['n_spd']} blocks: request latency {-100 * lat['e2e_cut']:+.1f}% "
            f"({lat['sync_e2e_ms']:.1f} -> {lat['e2e_ms']:.1f} ms), decode {-100 * lat['tpot_cut']:+.1f}% per token on "
            f"{lat['n_devices']}x {lat['device']}, {lat['interconnect']} ({lat['how']} of {lat['source']})")
