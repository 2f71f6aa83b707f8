"""The SPD pipeline end to end (launch/train_distill.py is a thin wrapper over `run_pipeline`).

`run_pipeline` owns the output folder (a lock, no half-made folders, resume checks); `_run_pipeline` is the
list of stages (`pipeline.stages`): prepare -> sensitivity + plan -> head grouping -> distillation -> final
perplexities, then plan.json, the Orbax checkpoint, report.json and PNG plots in --out.

Resumable: the checkpoint (params + pipeline state, + optimizer state mid-block) is saved after
sensitivity, after each grouped/distilled block and every `save_every` distillation steps. `--resume`
continues from the latest one. Data order is deterministic, so a resumed run ends with the same
parameters as an uninterrupted one.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import time
from pathlib import Path

import jax
import numpy as np

from spd_jax.checkpoint import Checkpointer
from spd_jax.config import ConfigError
from spd_jax.distributed import is_main_process
from spd_jax.pipeline.config import PipelineConfig, check_resume, input_fingerprints
from spd_jax.pipeline.stages import STAGES, Run, StageTimer, log, prepare, start_run
from spd_jax.runlock import RunLock


def _make_out(out: Path) -> list[Path]:
    """Create `out` and its missing parents; returns the folders this call created, deepest first. Each
    `mkdir` is atomic, so of two runs starting together exactly one creates each folder."""
    missing = []
    p = out
    while not p.exists():
        missing.append(p)
        p = p.parent
    created = []
    for d in reversed(missing):
        try:
            d.mkdir()
            created.insert(0, d)
        except FileExistsError:
            pass
    if not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder")
    return created


def run_pipeline(pc: PipelineConfig, out: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Run (or resume) the pipeline into `out`, holding `out/.lock` throughout (one writer per folder).

    Checked before any work: `out` is not a file, no other run holds it, an existing checkpoint is
    only continued with `resume`, under the config and input contents it was written with. Only the lock
    holder creates or removes anything inside `out`; a fresh run that fails before its first checkpoint
    removes the folders it created (and its lock).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file, not a folder")
    main = is_main_process()
    created = _make_out(out) if main else []
    lock = RunLock(out)
    if main:
        lock.acquire()  # a run that loses the race stops here, having removed nothing
    else:
        out.mkdir(parents=True, exist_ok=True)
    try:
        ckpt = Checkpointer(out / "checkpoint")
        inputs = input_fingerprints(pc)
        if ckpt.latest() is not None:
            if not resume:
                raise ConfigError(f"{out} already holds a checkpoint; pass --resume to continue it or choose "
                                  "another --out")
            check_resume(ckpt.restore_state(), pc, inputs, out)
        return _run_pipeline(pc, out, ckpt, resume, progress, inputs)
    except BaseException:
        if main and lock.held and Checkpointer(out / "checkpoint").latest() is None:
            import shutil

            shutil.rmtree(out / "checkpoint", ignore_errors=True)  # a fresh run that saved nothing: no checkpoint
            if out in created:  # the whole folder, lock included, while the lock is still ours
                shutil.rmtree(out, ignore_errors=True)
                lock.held = False
                for d in created[1:]:  # then the parents it made, if nothing else was put in them
                    _rmdir_if_empty(d)
        raise
    finally:
        lock.release()


def _rmdir_if_empty(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass


def _run_pipeline(pc: PipelineConfig, out: Path, ckpt: Checkpointer, resume: bool, progress: bool,
                  inputs: dict) -> dict:
    timer = StageTimer()
    store = None
    if pc.teacher_states == "disk":  # file-backed teacher states, one copy per host (ModelOps.hidden_states)
        (out / "teacher_states").mkdir(parents=True, exist_ok=True)
        store = str(out / "teacher_states" / "h")
    cal = prepare(pc, progress=progress, timer=timer, store=store)  # teacher states from the original weights
    run = start_run(cal, ckpt, out, inputs, resume)
    for name, stage in STAGES:
        with timer.stage(name):
            stage(run)
    report = build_report(run, timer)
    if store is not None:  # the teacher states are a cache of this run only
        from spd_jax.distributed import barrier, host_leader_index

        barrier("teacher states no longer read")
        if jax.process_index() == host_leader_index():
            import shutil

            shutil.rmtree(out / "teacher_states", ignore_errors=True)
    if is_main_process():
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "b2b_losses.json").write_text(json.dumps({str(k): v["losses"] for k, v in run.state.b2b.items()}))
        plot_report(report, out)
    return report


def build_report(run: Run, timer: StageTimer) -> dict:
    """report.json: the config, plan, perplexities by stage, what head grouping and distillation did, times,
    memory and machine."""
    st = run.state
    status_counts = {s: sum(v["status"] == s for v in st.b2b.values()) for s in sorted({v["status"] for v in st.b2b.values()})}
    if st.b2b:
        kept = status_counts.get("ok", 0)
        log(f"[B2B] {kept}/{len(st.b2b)} distilled blocks improved and were kept"
            + (f"; kept the original weights of {len(st.b2b) - kept} ({status_counts})" if kept < len(st.b2b) else ""))
    return {
        "config": dataclasses.asdict(run.cal.pc), "plan": st.plan, "ppl": st.ppl,
        "head_grouping": {str(k): v for k, v in st.hg.items()},
        "distillation": {str(k): {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in st.b2b.items()},
        "distillation_status_counts": status_counts,
        "timings_s": {**timer.timings, "total_s": time.time() - timer.start}, "memory_gib": timer.memory,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "jax": jax.__version__,
                    "devices": f"{jax.device_count()}x{jax.devices()[0].device_kind}"},
        "checkpoint": str(run.out / "checkpoint"),
        "expected_latency": run.latency,
    }


def plot_report(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["plan"]["blocks"]
    colours = {"ISB": "#4caf50", "SB": "#ff9800", "ESB": "#e53935"}
    fig, ax = plt.subplots(figsize=(max(6, len(blocks) * 0.3), 3.5))
    s = [b["sensitivity"] for b in blocks]
    ax.bar(range(len(blocks)), s, color=[colours[b["class"]] for b in blocks],
           edgecolor=["black" if b["mode"] == "spd" else "none" for b in blocks])
    ax.set_yscale("symlog", linthresh=0.1)
    ax.set_xlabel("block")
    ax.set_ylabel("sync sensitivity s_i (PPL)")
    ax.set_title("Sync sensitivity by block (black edge = dropped)")
    ax.legend(handles=[plt.Rectangle((0, 0), 1, 1, color=c) for c in colours.values()], labels=list(colours))
    fig.tight_layout()
    fig.savefig(out / "sensitivity.png", dpi=120)
    plt.close(fig)

    stages = [k for k in ("no_spd", "zs", "zs_hg", "final") if k in report["ppl"]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = np.arange(len(stages))
    for j, split in enumerate(("calib", "eval")):
        ax.bar(x + (j - 0.5) * 0.35, [report["ppl"][k][split] for k in stages], 0.35, label=split)
    ax.set_xticks(x, [{"no_spd": "no SPD", "zs": "ZS", "zs_hg": "ZS+HG", "final": "final"}[k] for k in stages])
    ax.set_ylabel("perplexity")
    ax.set_title(f"Perplexity by stage, SPD ratio {report['plan']['ratio']:.0%}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "perplexity.png", dpi=120)
    plt.close(fig)
