"""Markdown tables of launch/bench.py JSON results.

Usage:
  python scripts/bench_table.py RESULT.json...        one row per configuration (a campaign's table; peer-*.json
                                                     files are skipped: their numbers appear in the rows of the
                                                     bench file that names them with --peer-json)
  python scripts/bench_table.py --docs FILE.md...     rebuild every generated table of those files from its raw JSON
  python scripts/bench_table.py --docs FILE.md... --check
                                                     exit 1 if a committed table differs from its raw data or names
                                                     a raw file that does not exist (the test suite runs this)"""

from __future__ import annotations

import difflib
import json
import math
import re
import shlex
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



# ---- tables in the docs, regenerated from their raw JSON ---------------------------------------------------------
# A generated table sits between two markers in a Markdown file:
#   <!-- table: KIND ARG... -->
#   ...(this script's output)...
#   <!-- end table -->
# KIND and its ARGs (paths relative to the repository root; `label=path` where a row needs a name):
#   rows PATH...                        every configuration of each run (the campaign table)
#   cuts ratios=R,R links=L,L PATH...   one row per model and TP: SPD's end-to-end cut per ratio and link
#   ab LABEL=PATH...                    a decode-path A/B: sync, SPD on every block, floor, budget columns
#   budget PATH...                      where a step's time goes: weight stream, floor, overhead per block
#   allreduce PATH...                   the all-reduce microbenchmark of each run
#   serve LABEL=PATH...                 bench_serve.py load runs
#   accuracy PATH                       launch/study.py's results.json by SPD ratio
# An ARG `@LIST` stands for the paths listed in the file LIST (one per line), so that a table's sources can be
# shared between documents and kept out of the prose.
# `--docs FILE.md... [--check]` rewrites (or, with --check, compares) every such block.

ROOT = Path(__file__).resolve().parent.parent
BEGIN = re.compile(r"^<!-- table: (.+?) -->$")
END = "<!-- end table -->"
SHAPES = {"llama2-7b": "LLaMA-2-7B", "llama2-13b": "LLaMA-2-13B", "llama2-70b": "LLaMA-2-70B",
          "opt-30b": "OPT-30B", "tiny": "tiny"}


class TableError(ValueError):
    pass


def _load(path: str) -> dict:
    p = ROOT / path
    if not p.is_file():
        raise TableError(f"{path}: no such raw file")
    return json.loads(p.read_text())


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _cut(r: dict) -> float:
    return 1 - 1 / r["speedup_e2e_vs_sync"]


ROWS_HEAD = ["| shape | TP | link | config | ttft ms | tpot ms | e2e ms | e2e speed-up vs sync | e2e cut | AR removed "
             "| decode vs peer |", "|---|---|---|---|---|---|---|---|---|---|---|"]
ALLREDUCE_HEAD = ["| shape | TP | link | bytes | in-loop us | host-timed us | bus GB/s (in loop) |",
                  "|---|---|---|---|---|---|---|"]


def table_rows(paths: list[str]) -> list[str]:
    out = list(ROWS_HEAD)
    for p in paths:
        out += rows(_load(p))
    return out


def table_cuts(paths: list[str], ratios: list[str], links: list[str]) -> list[str]:
    cells: dict[tuple, dict] = {}
    order: list[tuple] = []
    for p in paths:
        d = _load(p)
        key = (d["shape"], d["tp"])
        if key not in cells:
            cells[key] = {}
            order.append(key)
        for r in d["rows"]:
            if "/" in r["label"] or not r["label"].startswith("r="):
                continue
            cells[key][(r["label"][2:], d["interconnect"])] = (_cut(r), p)
    head = [f"SPD on {float(r) * 100:.0f}% of blocks, {lk}" for lk in links for r in ratios]
    out = ["| model | TP | " + " | ".join(head) + " |", "|---|---|" + "---|" * len(head)]
    for key in order:
        vals = []
        for lk in links:
            for r in ratios:
                c = cells[key].get((f"{float(r):.2f}", lk))
                vals.append("-" if c is None else f"-{_pct(c[0])}")
        out.append(f"| {SHAPES.get(key[0], key[0])} | {key[1]} | " + " | ".join(vals) + " |")
    return out


def _row(d: dict, label: str) -> dict | None:
    return next((r for r in d["rows"] if r["label"] == label), None)


def table_ab(pairs: list[tuple[str, str]]) -> list[str]:
    """A decode-path A/B. The weight stream of every row uses the highest read bandwidth measured among the
    table's runs (one machine's reading moves by about 10% between processes, more than most A/B effects)."""
    runs = [(label, _load(p)) for label, p in pairs]
    bw = max((d["hbm"]["read_GBps"] for _, d in runs if d.get("hbm")), default=None)
    out = [f"| variant | shape | TP | attention | fused | folded | sync tpot ms | SPD all blocks | floor "
           f"| sync x stream | overhead us/block |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, d in runs:
        sync, spd, floor = _row(d, "r=0.00"), _row(d, "r=1.00"), _row(d, "floor")
        b = d.get("decode_budget") or {}
        ms = lambda r: "-" if r is None else f"{r['tpot_ms']:.3f}"  # noqa: E731
        xs = ov = None
        if bw and b.get("overhead_per_block_us") and floor is not None:
            blocks = round((floor["tpot_ms"] - b["bytes_ms"]) * 1e3 / b["overhead_per_block_us"])
            stream_ms = d["weight_bytes_per_device"] / (bw * 1e9) * 1e3
            xs, ov = sync["tpot_ms"] / stream_ms, (floor["tpot_ms"] - stream_ms) * 1e3 / blocks
        out.append(f"| {label} | {SHAPES.get(d['shape'], d['shape'])} | {d['tp']} | {d.get('attention_kernel', 'xla')} | "
                   f"{'yes' if d.get('fused_projections') else 'no'} | {'yes' if d.get('fold_norms') else 'no'} | "
                   f"{ms(sync)} | {ms(spd) if d['tp'] > 1 else '-'} | {ms(floor)} | "
                   f"{'-' if xs is None else f'{xs:.2f}'} | {'-' if ov is None else f'{ov:.1f}'} |")
    if bw:
        out.append(f"\n(weight stream at the highest read bandwidth among these runs: {bw:,.0f} GB/s)")
    return out


def table_budget(paths: list[str]) -> list[str]:
    out = ["| shape | TP | link | sync tpot ms | floor tpot ms | weight stream ms (read GB/s) | sync / stream "
           "| floor / stream | overhead per block us |", "|---|---|---|---|---|---|---|---|---|"]
    for p in paths:
        d = _load(p)
        b = d["decode_budget"]
        sync, floor = _row(d, "r=0.00"), _row(d, "floor")
        out.append(f"| {SHAPES.get(d['shape'], d['shape'])} | {d['tp']} | {d['interconnect']} | {sync['tpot_ms']:.3f} | "
                   f"{floor['tpot_ms']:.3f} | {b['bytes_ms']:.3f} ({d['hbm']['read_GBps']:,.0f}) | "
                   f"{b['x_bytes']['sync']:.2f}x | {b['x_bytes']['floor']:.2f}x | {b['overhead_per_block_us']:.1f} |")
    return out


def table_allreduce(paths: list[str]) -> list[str]:
    out = list(ALLREDUCE_HEAD)
    for p in paths:
        out += allreduce(_load(p))
    return out


def table_serve(pairs: list[tuple[str, str]]) -> list[str]:
    out = ["| run | requests | concurrent | tokens | answered | lost | answered twice | requests/s | tokens/s "
           "| latency p50 / p99 s | TTFT p50 / p99 s | engine decode ms/token | server overhead ms/token |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for label, p in pairs:
        d = _load(p)
        out.append(f"| {label} | {d['requests']} | {d['concurrency']} | {int(d['tokens'])} | {d['answered']} | "
                   f"{d['lost']} | {d['duplicate_ids']} | {d['requests_per_s']:.2f} | {d['tokens_per_s']:.1f} | "
                   f"{d['latency_p50_s']:.2f} / {d['latency_p99_s']:.2f} | {d['ttft_p50_s']:.2f} / {d['ttft_p99_s']:.2f} | "
                   f"{d['engine_decode_per_token_ms']:.1f} | {d['server_overhead_per_token_ms']:.2f} |")
    return out


def _acc_stderr(tasks: dict) -> float:
    """Standard error of the mean of the tasks' accuracies: each task's sqrt(acc (1 - acc) / (n - 1)) (lm-eval's
    acc_stderr), combined as sqrt(sum se^2) / k (spd_jax.evaluation.mean_accuracy_stderr)."""
    se = [math.sqrt(max(t["acc"] * (1 - t["acc"]), 0.0) / (t["n"] - 1)) for t in tasks.values()]
    return math.sqrt(sum(x * x for x in se)) / len(se)


def table_accuracy(paths: list[str]) -> list[str]:
    """The accuracy study (launch/study.py's results.json) by ratio: zero-shot and fully treated perplexity, mean
    zero-shot accuracy +- its standard error."""
    out = ["| blocks dropped | zero-shot perplexity | with distillation + head grouping | mean accuracy (ZS) |",
           "|---|---|---|---|"]
    for p in paths:
        d = _load(p)
        by = {(r["ratio"], r["method"]): r for r in d["rows"]}
        for ratio in d["ratios"]:
            zs = by.get((ratio, "ZS")) or by.get((ratio, "no SPD"))
            full = by.get((ratio, "ZS+B2B+HG"))
            label = "none" if ratio == 0 else f"{100 * ratio:.0f}%"
            treated = "-" if full is None else f"{full['ppl']:.2f}"
            out.append(f"| {label} | {zs['ppl']:.2f} | {treated} | "
                       f"{100 * zs['mean_acc']:.1f} ± {100 * _acc_stderr(zs['tasks']):.1f} |")
    return out


def _file_list(path: str) -> list[str]:
    """The raw files a `@LIST` argument names: one path per line of LIST, `#` starts a comment."""
    p = ROOT / path
    if not p.is_file():
        raise TableError(f"{path}: no such file list")
    return [line.split("#")[0].strip() for line in p.read_text().splitlines() if line.split("#")[0].strip()]


def render(spec: str) -> list[str]:
    """The lines of one generated table from its marker's spec (`KIND ARG...`)."""
    kind, *args = shlex.split(spec)
    args = [x for a in args for x in (_file_list(a[1:]) if a.startswith("@") else [a])]
    labelled = kind in ("ab", "serve")  # their ARGs are LABEL=PATH pairs
    opts = {k: v for k, v in (a.split("=", 1) for a in args if "=" in a and not labelled)}
    paths = [a for a in args if "=" not in a or labelled]
    if not paths:
        raise TableError(f"table {kind!r} names no raw file")
    if kind == "rows":
        return table_rows(paths)
    if kind == "cuts":
        return table_cuts(paths, opts.get("ratios", "0.7,1").split(","), opts.get("links", "nvlink").split(","))
    if labelled:
        pairs = [tuple(a.split("=", 1)) for a in paths]
        if any(len(pr) != 2 for pr in pairs):
            raise TableError(f"a {kind} table takes LABEL=PATH pairs")
        pairs = [(lbl.replace("_", " "), p) for lbl, p in pairs]
        return table_ab(pairs) if kind == "ab" else table_serve(pairs)
    if kind == "budget":
        return table_budget(paths)
    if kind == "allreduce":
        return table_allreduce(paths)
    if kind == "accuracy":
        return table_accuracy(paths)
    raise TableError(f"unknown table kind {kind!r}")


def regenerate(text: str, name: str = "") -> str:
    """The Markdown `text` with every generated block rebuilt from its raw files."""
    lines, out, i = text.split("\n"), [], 0
    while i < len(lines):
        line = lines[i]
        out.append(line)
        m = BEGIN.match(line.strip())
        i += 1
        if not m:
            continue
        j = i
        while j < len(lines) and lines[j].strip() != END:
            if BEGIN.match(lines[j].strip()):
                break
            j += 1
        if j == len(lines) or lines[j].strip() != END:
            raise TableError(f"{name}: the table `{m.group(1)}` has no `{END}`")
        out += render(m.group(1))
        out.append(END)
        i = j + 1
    return "\n".join(out)


def docs(paths: list[str], check: bool) -> int:
    bad = 0
    for p in paths:
        path = Path(p)
        text = path.read_text()
        try:
            new = regenerate(text, p)
        except TableError as e:
            print(f"error: {p}: {e}", file=sys.stderr)
            bad += 1
            continue
        if new != text:
            if check:
                diff = difflib.unified_diff(text.split("\n"), new.split("\n"), "committed", "regenerated", lineterm="", n=0)
                print(f"error: {p}: its generated tables differ from their raw data:\n" + "\n".join(list(diff)[:20]),
                      file=sys.stderr)
                bad += 1
            else:
                path.write_text(new)
                print(f"{p}: tables regenerated")
    return 1 if bad else 0


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
    print("\n".join(ROWS_HEAD + [line for d in ds for line in rows(d)]))
    ar = [line for d in ds for line in allreduce(d)]
    if ar:
        print("\n" + "\n".join(ALLREDUCE_HEAD + ar))


if __name__ == "__main__":
    argv = sys.argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    if argv[:1] == ["--docs"]:
        sys.exit(docs([a for a in argv[1:] if a != "--check"], check="--check" in argv))
    main(argv)
