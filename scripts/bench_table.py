"""Markdown table of launch/bench.py JSON results (one row per configuration), for docs/benchmarks.md.

Usage: python scripts/bench_table.py RESULT.json... (peer-*.json files are skipped: their numbers appear
in the rows of the bench file that names them with --peer-json)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def link(d: dict) -> str:
    """The interconnect mode, the process layout, and whether the mode was shown to slow small all-reduces."""
    if d["tp"] == 1:
        return "-"
    procs = d.get("n_processes", 1)
    layout = "1 proc/device" if procs == d.get("n_devices") and procs > 1 else f"{procs} proc"
    lc = d.get("link_check") or {}
    check = {"verified": f", verified {lc.get('slower_x', 0):.1f}x", "not slower": ", NOT slower than nvlink",
             "unverified": ", unverified"}.get(lc.get("status"), "")
    return f"{d['interconnect'].upper()} ({layout}{check})"


def rows(d: dict) -> list[str]:
    if "rows" not in d:
        return []
    head = f"{d['shape']} | {d['tp']} | {link(d)}"
    out = []
    for r in d["rows"]:
        rem = r.get("allreduce_time_removed")
        peers = r.get("vs_peers") or ({"eager": {"tpot_x": r["speedup_tpot_vs_peer"]}}
                                      if r.get("speedup_tpot_vs_peer") else {})
        peer = " / ".join(f"{v['tpot_x']:.1f}x ({k})" for k, v in peers.items())
        cfg = "sync" if r["label"] == "r=0.00" else r["label"]
        if r["label"].startswith("r=") and r["n_spd"]:
            cfg = f"SPD {r['label']} ({r['n_spd']} blocks)"
        # e2e cut: the share of the end-to-end time this configuration saves against the sync row of the same
        # all-reduce method (the floor row is the bound, not a configuration)
        cut = ("" if r["label"] == "floor" else "-" if not r["n_spd"]
               else f"{100 * (1 - 1 / r['speedup_e2e_vs_sync']):.1f}%")
        out.append(f"| {head} | {cfg} | {r['ttft_ms']:.2f} | {r['tpot_ms']:.3f} | {r['e2e_ms']:.1f} | "
                   f"{r['speedup_e2e_vs_sync']:.3f} | {cut} | {'-' if rem is None else f'{100 * rem:.0f}%'} | "
                   f"{peer} |")
    for p in d.get("peers") or ([d["peer"]] if "peer" in d else []):
        out.append(f"| {head} | transformers TP {p['tp']} peer ({p.get('config', 'eager, dynamic cache')}) | "
                   f"{p['ttft_ms']:.2f} | {p['tpot_ms']:.3f} | {p['e2e_ms']:.1f} | - | - | - | 1 |")
    return out


def allreduce(d: dict) -> list[str]:
    return [f"| {d['shape']} | {d['tp']} | {link(d)} | {a['bytes']} | "
            f"{a.get('in_loop_us', float('nan')):.1f} | {a['median_us']:.1f} | {a['bus_GBps']:.2f} |"
            for a in d.get("allreduce", [])]


def main(paths: list[str]) -> None:
    files = [Path(p) for p in paths if Path(p).is_file() and not Path(p).name.startswith("peer-")]
    if not files:
        print("no benchmark results to tabulate", file=sys.stderr)
        return
    ds = [json.loads(f.read_text()) for f in files]
    cards = sorted({f"{d.get('device')} (JAX {d.get('jax')})" for d in ds})
    d0 = ds[0]
    print(f"cards: {', '.join(cards)}; batch {d0.get('batch')}, {d0.get('prompt_len')} in / "
          f"{d0.get('new_tokens')} out, RANDOM {d0.get('dtype')} weights\n")
    print("| shape | TP | link | config | ttft ms | tpot ms | e2e ms | e2e speed-up vs sync | e2e cut | AR removed "
          "| decode vs peer |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for d in ds:
        print("\n".join(rows(d)))
    ar = [line for d in ds for line in allreduce(d)]
    if ar:
        print("\n| shape | TP | link | bytes | in-loop us | host-timed us | bus GB/s (in loop) |")
        print("|---|---|---|---|---|---|---|")
        print("\n".join(ar))


if __name__ == "__main__":
    main(sys.argv[1:])
