"""The accuracy study: SPD ratio sweep x methods (ZS, ZS+B2B, ZS+B2B+HG) on a real model.

Block-to-block distillation of block i trains on the teacher's hidden state h_i and target h_{i+1},
which do not depend on which other blocks are dropped; so each block is grouped/distilled once, and the
model for any (ratio, method) is assembled from the per-block results: sync blocks keep the original
weights, dropped blocks take ZS (original), B2B or HG+B2B weights. Blocks are dropped in the order of
Algorithm 1's sensitivity (least sensitive first). The methods are applied to every dropped block (the
paper's method sweep), not only to the classes the plan would assign them to.

The study runs for about 1.5 hours on a 2-core CPU, so it keeps its progress in a state folder: each
block's distilled weights (Orbax, `checkpoint.Checkpointer.save_block`) and each finished row. A run that
is killed and started again with the same settings and state folder continues where it stopped; the
folder is removed when the study finishes. State of a study with other settings is refused, not mixed in.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import time
from pathlib import Path

import jax
import numpy as np

from spd_jax.checkpoint import Checkpointer
from spd_jax.config import ConfigError
from spd_jax.evaluation import (
    Scorer,
    TaskResult,
    divergence_from_reference,
    evaluate_loaded,
    mean_accuracy,
    accuracy_stderr,
    mean_accuracy_stderr,
    perplexity,
)
from spd_jax.pipeline.analysis import select_by_ratio, sensitivity
from spd_jax.pipeline.config import PipelineConfig
from spd_jax.pipeline.distill import BlockDistiller
from spd_jax.pipeline.stages import head_group_accepted, prepare, with_block
from spd_jax.tasks import DEFAULT_TASKS, load_task

METHODS = ("ZS", "ZS+B2B", "ZS+B2B+HG")


class StudyState:
    """Progress of one study on disk: `progress.json` (settings fingerprint, finished blocks' summaries,
    finished rows) and the finished blocks' weights under `blocks/` (written before the JSON names them)."""

    def __init__(self, directory: Path, fingerprint: str):
        self.dir = Path(directory)
        self.file = self.dir / "progress.json"
        self.ck = Checkpointer(self.dir)
        if self.file.exists():
            try:
                self.data = json.loads(self.file.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"study state {self.file} is unreadable ({e}); remove {self.dir} to start over") from None
            if self.data.get("fingerprint") != fingerprint:
                raise ConfigError(f"study state {self.dir} belongs to a study with other settings (config, ratios, "
                                  f"limit or tasks); remove it, or pass another --state folder")
        else:
            self.data = {"fingerprint": fingerprint, "blocks": {}, "rows": []}
        self._t0, self._before = time.time(), float(self.data.get("elapsed_s", 0.0))

    def elapsed(self) -> float:
        """Seconds spent on this study by every run so far, this one included."""
        return self._before + time.time() - self._t0

    def _write(self) -> None:
        self.data["elapsed_s"] = self.elapsed()
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.file)  # atomic: a kill leaves the previous progress

    def block(self, i: int):
        return self.data["blocks"].get(str(i))

    def save_block(self, eng, i: int, b2b_params, hg_params, summary: dict) -> None:
        self.ck.save_block(f"b2b-{i}", eng, i, b2b_params)
        if hg_params is not None:
            self.ck.save_block(f"hg-{i}", eng, i, hg_params)
        self.data["blocks"][str(i)] = summary
        self._write()

    def restore_block(self, eng, i: int):
        """(B2B weights, HG+B2B weights or None if HG was not kept) of a finished block."""
        b2b = self.ck.restore_block(f"b2b-{i}", eng, i)
        hg = self.ck.restore_block(f"hg-{i}", eng, i) if self.block(i)["hg"].get("kept") else None
        return b2b, hg

    def row(self, ratio: float, method: str):
        return next((r for r in self.data["rows"] if r["ratio"] == ratio and r["method"] == method), None)

    def add_row(self, row: dict) -> None:
        self.data["rows"].append(row)
        self._write()

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def study_fingerprint(pc: PipelineConfig, ratios, limit: int, task_dirs) -> str:
    what = {"config": dataclasses.asdict(pc), "ratios": [float(r) for r in ratios], "limit": limit,
            "task_dirs": [str(Path(d).resolve()) for d in task_dirs]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]


def run_study(pc: PipelineConfig, ratios, limit: int, task_dirs, out_json: Path, log=print,
              state_dir: Path | None = None, command: str | None = None) -> dict:
    """The sweep; with `state_dir`, progress is kept there and a repeated call continues from it."""
    t_start = time.time()
    st = StudyState(state_dir, study_fingerprint(pc, ratios, limit, task_dirs)) if state_dir else None
    if st and (st.data["blocks"] or st.data["rows"]):
        log(f"[study] resuming from {st.dir}: {len(st.data['blocks'])} blocks distilled, "
            f"{len(st.data['rows'])} rows evaluated")
    cal = prepare(pc, eval_states=False)  # the pipeline's own set-up: model, data, weights, teacher states
    eng, orig, h, ops, cfg, L = cal.engine, cal.orig, cal.h_cal, cal.ops, cal.lm.cfg, cal.n_layers
    ev, calib, tok = cal.ev, cal.calib, cal.tok
    sens = sensitivity(ops, orig, h, calib, pc.sensitivity, progress=False)
    log(f"[study] sensitivity done; base calibration PPL {sens.base_ppl:.3f}")

    distiller = BlockDistiller(ops, pc.distill)
    b2b, hg_b2b, hg_info, b2b_info = {}, {}, {}, {}
    for i in range(L):
        done = st.block(i) if st else None
        if done:
            b2b[i], hg = st.restore_block(eng, i)
            hg_b2b[i] = hg if hg is not None else b2b[i]
            b2b_info[i], hg_info[i] = done["b2b"], done["hg"]
            continue
        res = distiller.distill(i, orig["layers"][i], h[i], h[i + 1], progress=False)
        b2b[i] = res.params
        b2b_info[i] = {"initial_mse": res.initial_mse, "final_mse": res.final_mse, "status": res.status}
        new, info = head_group_accepted(cal, distiller, orig["layers"][i], i)  # the pipeline's acceptance rule
        hg_info[i] = {k: v for k, v in info.items() if k in ("applied", "kept", "block_mse_before", "block_mse_after")}
        hg_b2b[i] = b2b[i] if new is None else distiller.distill(i, new, h[i], h[i + 1], progress=False).params
        if st:
            st.save_block(eng, i, b2b[i], hg_b2b[i] if new is not None else None, {"b2b": b2b_info[i], "hg": hg_info[i]})
        log(f"[study] block {i} ({i + 1}/{L}): B2B MSE {res.initial_mse:.4g}->{res.final_mse:.4g}; "
            f"HG {'kept' if new is not None else 'not kept'}")

    tasks = [load_task(t, limit, task_dirs) for t in DEFAULT_TASKS]
    rows = []
    for ratio in ratios:
        chosen = select_by_ratio(sens.s, ratio)
        plan = ops.plan(chosen)
        for method in (METHODS if chosen else ("no SPD",)):
            row = st.row(ratio, method) if st else None
            if row is None:
                row = _evaluate_row(eng, orig, ev, tok, tasks, cfg, chosen, plan, ratio, method, b2b, hg_b2b)
                if st:
                    st.add_row(row)
            rows.append(row)
            log(f"[study] ratio {ratio:.2f} {method:10s} ppl {row['ppl']:.3f} mean acc {row['mean_acc']:.4f} "
                f"({len(rows)} rows)")
    out = {"config": dataclasses.asdict(pc), "ratios": list(ratios), "limit": limit, "sensitivity": sens.s,
           "base_calib_ppl": sens.base_ppl, "order": sorted(range(L), key=lambda i: (sens.s[i], -i)),
           "b2b": b2b_info, "hg": hg_info, "rows": rows, "eval_tokens": int(ev.size),
           "calib": list(calib.shape), "seconds": st.elapsed() if st else time.time() - t_start,
           "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "jax": jax.__version__,
                       "devices": f"{jax.device_count()}x{jax.devices()[0].device_kind}"},
           "date": datetime.date.today().isoformat(), "command": command}
    out_json.write_text(json.dumps(out, indent=2))
    if st:
        st.remove()
    return out


def _evaluate_row(eng, orig, ev, tok, tasks, cfg, chosen, plan, ratio, method, b2b, hg_b2b) -> dict:
    params = orig
    if method != "ZS" and chosen:
        src = b2b if method == "ZS+B2B" else hg_b2b
        for i in chosen:
            params = with_block(params, i, src[i])
    sc = Scorer(eng, params, plan, batch_size=16)
    ppl = perplexity(sc, ev)
    vs = divergence_from_reference(eng, orig, params, plan, ev, batch_size=8)
    res = [evaluate_loaded(sc, tok, name, fmt, items, cfg.max_position) for name, fmt, items in tasks]
    return {"ratio": ratio, "n_dropped": len(chosen), "method": method, "ppl": ppl,
            "top1_agreement": vs["top1_agreement"], "kl_mean": vs["kl_mean"],
            "mean_acc": mean_accuracy(res), "mean_acc_stderr": mean_accuracy_stderr(res),
            "tasks": {r.name: {"acc": r.acc, "acc_stderr": r.acc_stderr, "acc_norm": r.acc_norm, "n": r.n}
                      for r in res}}


def row_stderr(row: dict) -> float:
    """The standard error of a study row's mean accuracy (computed from its tasks' accuracies and sizes, so rows
    written before it was recorded get it too)."""
    return mean_accuracy_stderr([TaskResult(k, t["n"], t["acc"], t.get("acc_norm", t["acc"]))
                                 for k, t in row["tasks"].items()])


def accuracy_drop(base: dict, row: dict) -> tuple[float, float]:
    """(mean-accuracy drop of `row` against `base`, in points; its standard error: the two rows' errors combined,
    which overstates it a little where both rows score the same items)."""
    return 100 * (base["mean_acc"] - row["mean_acc"]), 100 * math.hypot(row_stderr(base), row_stderr(row))


NOTES_MARKER = "<!-- Everything below this line is kept when launch/study.py regenerates this file. -->"


def write_results_md(study: dict, md: Path, png: Path, command: str) -> None:
    """Write the results page; the hand-written notes below `NOTES_MARKER` in an existing page are kept."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = study["rows"]
    base = next(r for r in rows if r["method"] == "no SPD")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for m in METHODS:
        pts = [base] + [r for r in rows if r["method"] == m]
        axes[0].plot([100 * r["ratio"] for r in pts], [100 * r["mean_acc"] for r in pts], marker="o", label=m)
        axes[1].plot([100 * r["ratio"] for r in pts], [r["ppl"] for r in pts], marker="o", label=m)
    axes[0].set(xlabel="SPD ratio (% of blocks)", ylabel="mean zero-shot accuracy (%)", title="Accuracy")
    axes[1].set(xlabel="SPD ratio (% of blocks)", ylabel="perplexity (held-out wiki)", title="Perplexity", yscale="log")
    for a in axes:
        a.legend()
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)

    tasks = list(base["tasks"])
    lines = [
        "# Accuracy results", "",
        f"Generated by `{command}` on {study['date']} ({study['machine']['platform']}, "
        f"{study['machine']['cpus']} CPUs, JAX {study['machine']['jax']}, TP {study['config']['tp']} "
        f"{'emulated on one device' if study['config']['emulate'] else 'on ' + study['machine']['devices']}); "
        f"took {study['seconds'] / 60:.0f} min.", "",
        f"Model: the embedded SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to float32), TP 3. Calibration: "
        f"{study['calib'][0]} x {study['calib'][1]} tokens from the offline Wikipedia train split; perplexity on "
        f"{study['eval_tokens']} held-out tokens (eval split); zero-shot accuracy on the five BIG-bench tasks, "
        f"first {study['limit']} examples each (acc, log-likelihood scoring). B2B: lr "
        f"{study['config']['distill']['lr']}, {study['config']['distill']['epochs']} epochs, batch "
        f"{study['config']['distill']['batch_size']}; HG accepted {study['config']['hg_accept']}.", "",
        "![accuracy and perplexity vs SPD ratio](results.png)", "",
        "Top-1 agreement and KL compare each row's next-token distribution with the unmodified model's on the "
        "held-out text (every position): unlike accuracies near chance, they show small changes.", "",
        "Accuracies are in percent, ± one standard error (lm-evaluation-harness's `acc_stderr`: "
        "sqrt(acc (1 - acc) / (n - 1)) per task; the mean's is sqrt(sum of the squares) / tasks).", "",
        "| SPD ratio | blocks dropped | method | perplexity | top-1 agreement | KL (nats) | mean acc | "
        + " | ".join(tasks) + " |",
        "|---|---|---|---|---|---|---|" + "---|" * len(tasks),
    ]
    for r in rows:
        agree = f"{100 * r['top1_agreement']:.1f}%" if "top1_agreement" in r else "-"
        kl = f"{r['kl_mean']:.3f}" if "kl_mean" in r else "-"
        lines.append(f"| {100 * r['ratio']:.0f}% | {r['n_dropped']} | {r['method']} | {r['ppl']:.2f} | {agree} | "
                     f"{kl} | {100 * r['mean_acc']:.1f} ± {100 * row_stderr(r):.1f} | "
                     + " | ".join(f"{100 * r['tasks'][t]['acc']:.1f} ± {100 * accuracy_stderr(r['tasks'][t]['acc'], r['tasks'][t]['n']):.1f}"
                                  for t in tasks) + " |")
    full = [r for r in rows if r["ratio"] == 1.0]
    lines += ["", "## Targets", ""]
    if full:
        zs = next(r for r in full if r["method"] == "ZS")
        best = min((r for r in full if r["method"] != "ZS"), key=lambda r: r["ppl"])
        inc = zs["ppl"] - base["ppl"]
        rec = (zs["ppl"] - best["ppl"]) / inc if inc > 0 else float("nan")
        lines.append(f"- At 100% SPD, zero-shot raises perplexity {base['ppl']:.2f} -> {zs['ppl']:.2f}; the best "
                     f"treated model ({best['method']}) reaches {best['ppl']:.2f}, recovering {100 * rec:.0f}% of the "
                     f"increase (target: at least 50%): **{'met' if rec >= 0.5 else 'not met'}**.")
    # "within 1 point" is shown only where the drop plus two standard errors stays within it
    cand = [r for r in rows if r["ratio"] >= 0.5 and r["method"] != "no SPD"]
    shown = [r for r in cand if sum(accuracy_drop(base, r) * np.array([1, 2])) <= 1.0]
    best = min(cand, key=lambda r: accuracy_drop(base, r)[0], default=None)
    line = (f"- An SPD ratio of at least 50% within 1 point of no-SPD mean accuracy ({100 * base['mean_acc']:.1f} ± "
            f"{100 * row_stderr(base):.1f}), judged as drop + 2 standard errors <= 1 point: "
            f"**{'met' if shown else 'not shown'}**")
    if best is not None:
        d, se = accuracy_drop(base, best)
        line += (f"; the smallest drop at >= 50% is {best['method']} at {100 * best['ratio']:.0f}%: {d:+.1f} ± {se:.1f} "
                 f"points" + (", within its noise: these task sizes cannot resolve a 1-point difference"
                              if abs(d) < 2 * se and 2 * se > 1 else ""))
    lines.append(line + ".")
    lines += ["", "Differences between rows smaller than about two standard errors of their difference are within "
              "the noise of these task sizes.", ""]
    old = md.read_text() if md.exists() else ""
    notes = old[old.index(NOTES_MARKER):] if NOTES_MARKER in old else ""
    md.write_text("\n".join(lines) + "\n" + notes)
