"""The SPD pipeline's stages, each a function over one typed, checkpointable `Run`.

    prepare        model, engine, weights, calibration / held-out tokens, teacher hidden states (`Calibration`)
    sensitivity    Algorithm 1, ISB/SB/ESB classes, the blocks chosen (by ratio or a perplexity budget): the plan
    head_grouping  the chosen ESB blocks regrouped, kept by the one acceptance rule (`head_group_accepted`)
    distill        block-to-block distillation of the chosen SB/ESB blocks
    final_ppl      the treated model's perplexities; the full parameters saved

Every stage reads what it needs from the `Run` and records what it did in its `PipelineState`, which each
checkpoint carries; a stage finds its finished work there, so a resumed run skips it (a block, a step at a time).
The study (`pipeline.study`) builds on the same `prepare`, `head_group_accepted` and `with_block`.
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Literal

import jax
import numpy as np

from spd_jax.checkpoint import Checkpointer
from spd_jax.config import ConfigError
from spd_jax.data import DataSpec, calibration_tokens, contiguous_sequences, eval_stream
from spd_jax.distributed import is_main_process
from spd_jax.loading import LoadedModel, load_weights, open_engine
from spd_jax.pipeline.analysis import (
    TREATMENT,
    classify,
    order_by_sensitivity,
    select_by_budget,
    select_by_ratio,
    sensitivity,
    thresholds,
)
from spd_jax.pipeline.config import PipelineConfig
from spd_jax.pipeline.distill import BlockDistiller, make_optimizer
from spd_jax.pipeline.grouping import head_group_block
from spd_jax.pipeline.latency import describe, expected_latency, read_bench
from spd_jax.pipeline.ops import ModelOps
from spd_jax.plan import PLAN_VERSION, SyncPlan, save_plan
from spd_jax.runtime import Engine, Params


def log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


def block_of(params: Params, i: int) -> Params:
    return params["layers"][i]


def with_block(params: Params, i: int, bp: Params) -> Params:
    """`params` with block i's parameters replaced by `bp` (a new tree; the other leaves shared)."""
    layers = dict(params["layers"])  # nnx.to_pure_dict keys layers by int
    layers[i] = bp
    return {**params, "layers": layers}


def memory_peaks() -> dict:
    """Peak memory so far: GPU bytes in use (the largest over this process's devices; None where the backend
    keeps no statistics, e.g. CPU) and this process's peak host resident set, both in GiB."""
    import resource

    gpu = None
    for d in jax.local_devices():
        stats = d.memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            gpu = max(gpu or 0, stats["peak_bytes_in_use"])
    host_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"gpu_peak_gib": None if gpu is None else gpu / 2**30, "host_peak_gib": host_kib / 2**20}


@dataclasses.dataclass
class StageTimer:
    """Wall time and peak memory after each stage (report.json's timings_s and memory_gib)."""

    quiet: bool = False
    timings: dict[str, float] = dataclasses.field(default_factory=dict)
    memory: dict[str, dict] = dataclasses.field(default_factory=dict)
    start: float = dataclasses.field(default_factory=time.time)

    @contextmanager
    def stage(self, name: str):
        t0 = time.time()
        yield
        self.timings[f"{name}_s"] = time.time() - t0
        m = self.memory[name] = memory_peaks()
        if not self.quiet:
            gpu = "n/a" if m["gpu_peak_gib"] is None else f"{m['gpu_peak_gib']:.1f} GiB"
            log(f"[stage] {name}: {self.timings[f'{name}_s']:.1f} s; peak so far: GPU {gpu} per device, host RSS "
                f"{m['host_peak_gib']:.1f} GiB (process 0)")


# ----------------------------------------------------------------------------- what every stage reads


@dataclasses.dataclass
class Calibration:
    """Made once per run (and by the study): the model and its batched operations, the unmodified weights, the
    calibration tokens (train split), the held-out tokens and the teacher's hidden states of both."""

    pc: PipelineConfig
    lm: LoadedModel
    tok: Any  # the model's tokenizer
    ops: ModelOps
    orig: Params
    calib: np.ndarray  # [N, calib_len] tokens
    ev: np.ndarray  # [M, calib_len] held-out tokens
    h_cal: np.ndarray  # [L+1, N, T, D]: the input of every block and the last block's output
    h_ev: np.ndarray | None  # the same for `ev` (None: not computed)
    progress: bool = False

    @property
    def engine(self) -> Engine:
        return self.ops.engine

    @property
    def n_layers(self) -> int:
        return self.lm.cfg.n_layers

    def ppls(self, plan: SyncPlan, params: Params, what: str) -> dict:
        """Perplexity of `params` under `plan` on the calibration and the held-out tokens."""
        bar = (lambda split: f"perplexity {what} ({split})") if self.progress and is_main_process() else (lambda _: None)
        return {"calib": self.ops.ppl(params, self.h_cal, self.calib, plan, bar("calibration")),
                "eval": self.ops.ppl(params, self.h_ev, self.ev, plan, bar("evaluation"))}


def check_model(pc: PipelineConfig, cfg) -> None:
    """What the settings ask of the model, checked before anything heavy: the calibration length fits its
    context; a latency benchmark (`latency_from`) is of its shape and TP degree."""
    cfg.check_fits(pc.calib_len, "calib_len: a calibration sequence", "lower --calib-len")
    if pc.latency_from is not None:
        read_bench(pc.latency_from, cfg.n_layers, pc.tp)


def prepare(pc: PipelineConfig, *, progress: bool = False, timer: StageTimer | None = None,
            store: str | None = None, eval_states: bool = True) -> Calibration:
    """Open the model, read the data, load the weights, run the teacher. store: a path prefix for file-backed
    teacher states (`ModelOps.hidden_states`); eval_states: also the held-out tokens' hidden states."""
    timer = timer or StageTimer(quiet=True)
    with timer.stage("data"):
        lm, engine = open_engine(pc, lambda cfg: check_model(pc, cfg))
        tok = lm.tokenizer()
        eos = lm.cfg.eos_token_ids[0] if lm.cfg.eos_token_ids else None
        calib = calibration_tokens(DataSpec(pc.data, pc.calib_samples, pc.calib_len, pc.seed), tok, eos)
        ev = contiguous_sequences(eval_stream(pc.data, tok, eos), pc.calib_len, pc.eval_tokens)
    if not timer.quiet:
        log(f"[data] calibration {calib.shape[0]}x{calib.shape[1]} tokens (train split), "
            f"evaluation {ev.shape[0]}x{ev.shape[1]} tokens (held-out split) from {pc.data!r}")
    with timer.stage("load"):
        orig = load_weights(engine, lm)
    ops = ModelOps(engine, pc.batch_size, pc.spd_attn_bias)
    with timer.stage("hidden_states"):
        h_cal = ops.hidden_states(orig, calib, progress, "teacher hidden states (calibration)",
                                  None if store is None else store + "_calib")
        h_ev = None
        if eval_states:
            h_ev = ops.hidden_states(orig, ev, progress, "teacher hidden states (evaluation)",
                                     None if store is None else store + "_eval")
    return Calibration(pc, lm, tok, ops, orig, calib, ev, h_cal, h_ev, progress)


def head_group_accepted(cal: Calibration, distiller: BlockDistiller, bp: Params, i: int) -> tuple[Params | None, dict]:
    """Head grouping of block i from its weights `bp` (this engine's layout), and the one acceptance rule: the
    regrouped block is kept when `hg_accept` is "always" (the paper) or, with "if_better", when its SPD-mode MSE
    against the teacher's next hidden state is lower than the original's. Returns (the regrouped weights if kept,
    else None; what happened: groups, scatter, MSEs, `applied`, `kept`)."""
    pc, eng = cal.pc, cal.engine
    spec = eng.mdef.specs()["layers"][i]
    new, info = head_group_block(cal.ops.block_graphdef, cal.ops.block_infos, eng.to_global(bp, spec),
                                 cal.h_cal[i][: pc.hg_samples], cal.lm.cfg, eng.mdef.layout, pc.spd_attn_bias)
    if not info["applied"]:
        return None, {**info, "kept": False}
    new = eng.from_global(new, spec)
    before = distiller.mse(bp, cal.h_cal[i], cal.h_cal[i + 1])
    after = distiller.mse(new, cal.h_cal[i], cal.h_cal[i + 1])
    keep = pc.hg_accept == "always" or after < before
    return (new if keep else None), {**info, "block_mse_before": before, "block_mse_after": after, "kept": keep}


# ----------------------------------------------------------------------------- the run's state


@dataclasses.dataclass
class PipelineState:
    """A run's progress: what every checkpoint records (JSON; block indices as strings there, as ever)."""

    config: dict
    tp: int
    inputs: dict | None = None  # content fingerprints of model and data (absent in the oldest checkpoints)
    stage: Literal["start", "planned", "done"] = "start"
    plan: dict | None = None  # plan.json's content, once the sensitivity stage chose the blocks
    ppl: dict[str, dict] = dataclasses.field(default_factory=dict)  # no_spd, zs, zs_hg, final -> calib/eval
    hg: dict[int, dict] = dataclasses.field(default_factory=dict)  # head grouping of each finished block
    b2b: dict[int, dict] = dataclasses.field(default_factory=dict)  # distillation of each finished block
    b2b_current: dict | None = None  # the block in training: block, step, losses, initial_mse
    block_files: dict[int, str] = dataclasses.field(default_factory=dict)  # finished blocks under checkpoint/blocks
    save: int = 0  # checkpoint steps written

    INT_KEYED = ("hg", "b2b", "block_files")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        for k in self.INT_KEYED:
            d[k] = {str(i): v for i, v in d[k].items()}
        if d["plan"] is None:
            del d["plan"]
        return d

    @classmethod
    def from_json(cls, d: dict, where: str) -> "PipelineState":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"{where}: the pipeline state has fields this version does not know ({unknown}): it was "
                              "written by another version of spd-jax; finish it with that version or start a new --out")
        d = dict(d)
        for k in cls.INT_KEYED:
            d[k] = {int(i): v for i, v in (d.get(k) or {}).items()}
        return cls(**d)


@dataclasses.dataclass
class Run:
    """One pipeline run: what it reads (`cal`), where it stands (`state`), the parameters so far, its checkpoints."""

    cal: Calibration
    state: PipelineState
    params: Params
    ckpt: Checkpointer
    out: Path
    distiller: BlockDistiller
    opt_state: Any = None  # the optimizer state of a block resumed mid-training
    latency: dict | None = None  # what the plan buys on the hardware of `latency_from` (pipeline.latency)

    @property
    def sync_plan(self) -> SyncPlan:
        return SyncPlan.from_plan(self.state.plan, self.cal.n_layers, self.cal.pc.spd_attn_bias, where="pipeline state")

    def set_block(self, i: int, bp: Params) -> None:
        self.params = with_block(self.params, i, bp)

    def save(self, opt=None, block: int | None = None, full: bool = False) -> None:
        """A checkpoint step: the state, plus the block in training (with `opt`) or, at the end, everything."""
        self.state.save += 1
        eng = self.cal.engine
        self.ckpt.save(self.state.save, eng, self.params if full else None, self.state.to_json(), opt,
                       None if block is None else (block_of(self.params, block), eng.mdef.specs()["layers"][block]))

    def finish_block(self, i: int, treatment: str) -> None:
        """Block i's new weights are final for `treatment`: written once, then recorded in the state."""
        name = f"block{i:03d}_{treatment}"
        self.ckpt.save_block(name, self.cal.engine, i, block_of(self.params, i))
        self.state.block_files[i] = name


def start_run(cal: Calibration, ckpt: Checkpointer, out: Path, inputs: dict, resume: bool) -> Run:
    """A fresh run from the original weights, or (resume) the state, finished blocks and block in training of the
    latest checkpoint (its settings and inputs were checked by `run_pipeline`)."""
    pc, eng = cal.pc, cal.engine
    run = Run(cal, PipelineState(dataclasses.asdict(pc), pc.tp, inputs), cal.orig, ckpt, out,
              BlockDistiller(cal.ops, pc.distill))
    if not (resume and ckpt.latest() is not None):
        return run
    where = f"checkpoint {ckpt.dir}"
    state = PipelineState.from_json(ckpt.restore_state(), where)
    if state.stage == "done":
        run.params, saved = ckpt.restore(eng)
        state = PipelineState.from_json(saved, where)
    else:  # the original weights + every finished block + the block in training
        for i, name in state.block_files.items():
            run.set_block(i, ckpt.restore_block(name, eng, i))
        if state.b2b_current:
            i, dc = state.b2b_current["block"], pc.distill
            steps = dc.epochs * -(-pc.calib_samples // dc.batch_size)
            opt_target = make_optimizer(dc, dc.lr_for(cal.lm.cfg.family), steps).init(block_of(cal.orig, i))
            bp, run.opt_state = ckpt.restore_block_in_training(eng, i, opt_target)
            run.set_block(i, bp)
    state.config = dataclasses.asdict(pc)  # equal up to RESUME_SAFE_FIELDS (checked by run_pipeline)
    state.inputs = inputs  # equal contents (check_resume); recorded also for checkpoints older than that
    run.state = state
    log(f"[resume] from checkpoint {ckpt.latest()} at stage {state.stage!r}"
        + (f", block {state.b2b_current['block']} step {state.b2b_current['step']}" if state.b2b_current else ""))
    return run


# ----------------------------------------------------------------------------- the stages


def sensitivity_stage(run: Run) -> None:
    """Algorithm 1's sensitivities, the classes, the chosen blocks (by ratio or within the perplexity budget), and
    the perplexities without SPD and with zero-shot SPD on them; plan.json written."""
    cal, pc, st = run.cal, run.cal.pc, run.state
    if st.plan is None:
        ops, L = cal.ops, cal.n_layers
        sens = sensitivity(ops, cal.orig, cal.h_cal, cal.calib, pc.sensitivity, progress=cal.progress,
                           log=None if cal.progress else log)
        t1, t2 = thresholds(sens.base_ppl, pc.tau1, pc.tau2, pc.tau1_rel, pc.tau2_rel)
        classes = classify(sens.s, t1, t2)
        budget_trials = None
        if pc.max_ppl_increase is not None:
            chosen, budget_trials = select_by_budget(
                sens.s, sens.base_ppl, pc.max_ppl_increase,
                lambda blocks: ops.ppl(cal.orig, cal.h_cal, cal.calib, ops.plan(blocks)))
        else:
            chosen = select_by_ratio(sens.s, pc.ratio)
        zs_plan = ops.plan(chosen)
        cfg = cal.lm.cfg
        st.plan = {
            "version": PLAN_VERSION, "model": str(cal.lm.path), "arch": cfg.arch, "tp": pc.tp, "n_layers": L,
            "ratio": len(chosen) / L, "requested_ratio": pc.ratio, "max_ppl_increase": pc.max_ppl_increase,
            "budget_trials": budget_trials,
            "data": {"source": pc.data, "calib_samples": pc.calib_samples, "calib_len": pc.calib_len, "seed": pc.seed},
            "sensitivity_method": sens.method, "base_ppl": sens.base_ppl, "tau1": t1, "tau2": t2,
            "order": order_by_sensitivity(sens.s), "ppl_curve": sens.ppl_curve,
            "blocks": [{"index": i, "mode": zs_plan.modes[i], "sensitivity": sens.s[i],
                        "class": classes[i], "treatment": TREATMENT[classes[i]] if zs_plan.is_spd(i) else None}
                       for i in range(L)],
        }
        st.ppl["no_spd"] = cal.ppls(ops.plan([]), cal.orig, "no SPD")
        st.ppl["zs"] = cal.ppls(zs_plan, cal.orig, "zero-shot")
        st.stage = "planned"
        run.save()
        log(f"[plan] {len(chosen)}/{L} blocks dropped: {chosen}; classes ISB/SB/ESB = "
            f"{classes.count('ISB')}/{classes.count('SB')}/{classes.count('ESB')} (tau1={t1:.4g}, tau2={t2:.4g})")
        log(f"[ppl] no SPD {st.ppl['no_spd']}; zero-shot {st.ppl['zs']}")
    if is_main_process():
        save_plan(st.plan, run.out / "plan.json")


def _chosen(run: Run, classes: tuple[str, ...]) -> list[int]:
    return [b["index"] for b in run.state.plan["blocks"] if b["mode"] == "spd" and b["class"] in classes]


def head_grouping_stage(run: Run) -> None:
    """Head grouping of the chosen ESB blocks, each kept or reverted by `head_group_accepted`."""
    cal, st = run.cal, run.state
    if not cal.pc.head_grouping:
        return
    blocks = _chosen(run, ("ESB",))
    from tqdm.auto import tqdm

    for i in tqdm(blocks, desc="head grouping", disable=not cal.progress, unit="block"):
        if i in st.hg:
            continue
        new, info = head_group_accepted(cal, run.distiller, block_of(run.params, i), i)
        if new is not None:
            run.set_block(i, new)
            run.finish_block(i, "hg")
        st.hg[i] = info
        log(f"[HG] block {i}: " + (f"groups {info['groups']} -> devices {info['device_of_group']} "
                                   f"({info['scatter']}/{info['match']}), MLP-output norm "
                                   f"{info['mlp_norm_original_layout']:.4g} -> {info['mlp_norm_total']:.4g}, "
                                   f"block MSE {info['block_mse_before']:.4g} -> {info['block_mse_after']:.4g}"
                                   f" ({'kept' if info['kept'] else 'reverted'})" if info["applied"] else info["reason"]))
        run.save()
    if blocks and "zs_hg" not in st.ppl:
        st.ppl["zs_hg"] = cal.ppls(run.sync_plan, run.params, "zero-shot + HG")
        log(f"[ppl] zero-shot + HG {st.ppl['zs_hg']}")


def distill_stage(run: Run) -> None:
    """Block-to-block distillation of the chosen SB/ESB blocks, checkpointed every `save_every` steps.

    distill.inputs: "teacher" (the paper): every block learns on the unmodified model's hidden states; "student":
    blocks are distilled in order, each on the hidden states the already treated model (SPD plan + distilled or
    regrouped blocks before it) produces, so it also learns to correct the error accumulated upstream. Targets
    are the teacher's outputs either way."""
    cal, st, dc = run.cal, run.state, run.cal.pc.distill
    blocks = _chosen(run, ("SB", "ESB"))
    if dc.epochs == 0 or not blocks:
        return
    t0, done_now = time.time(), 0  # blocks distilled by this process (the ETA's rate)
    x_student = cal.h_cal[0] if dc.inputs == "student" else None
    for i in range(max(blocks) + 1):
        if i in blocks and i not in st.b2b:
            _distill_block(run, i, cal.h_cal[i] if x_student is None else x_student)
            done_now += 1
            left = sum(b not in st.b2b for b in blocks)
            res = st.b2b[i]
            log(f"[B2B] block {i}: MSE {res['initial_mse']:.4g} -> {res['final_mse']:.4g} ({res['status']})"
                + (f" {res['message']}" if res["message"] else "")
                + f"; {len(blocks) - left}/{len(blocks)} blocks done"
                + (f", ETA {(time.time() - t0) / done_now * left / 60:.1f} min" if left else ""))
        if x_student is not None and i < max(blocks):  # the treated model's input to block i + 1
            x_student = cal.ops.apply_block(block_of(run.params, i), x_student, run.sync_plan.is_spd(i))


def _distill_block(run: Run, i: int, x_in) -> None:
    """Distill block i from its current weights (or from the step a resumed checkpoint reached) and record it."""
    cal, st, dc = run.cal, run.state, run.cal.pc.distill
    cur = st.b2b_current if (st.b2b_current or {}).get("block") == i else {}
    start_step = cur.get("step", 0)

    def on_step(step, bp, ost, losses, initial):
        if step % cal.pc.save_every == 0:
            run.set_block(i, bp)
            st.b2b_current = {"block": i, "step": step, "losses": list(losses), "initial_mse": initial}
            run.save(ost, block=i)
            log(f"[checkpoint] saved block {i} step {step}")

    res = run.distiller.distill(i, block_of(run.params, i), x_in, cal.h_cal[i + 1], start_step=start_step,
                                opt_state=run.opt_state if start_step else None, losses=cur.get("losses", []),
                                initial=cur.get("initial_mse") if start_step else None, on_step=on_step,
                                progress=cal.progress)
    run.opt_state = None
    run.set_block(i, res.params)
    if res.status == "ok":
        run.finish_block(i, "b2b")
    st.b2b[i] = {"status": res.status, "initial_mse": res.initial_mse, "final_mse": res.final_mse,
                 "steps": len(res.losses), "losses": res.losses, "message": res.message,
                 "lr": dc.lr_for(cal.lm.cfg.family), "inputs": dc.inputs}
    st.b2b_current = None
    run.save()


def final_stage(run: Run) -> None:
    """The treated model's perplexities; the full parameters saved (the per-block folders are then removed). A
    resumed finished run has both already."""
    st = run.state
    if st.stage != "done":
        st.ppl["final"] = run.cal.ppls(run.sync_plan, run.params, "final")
        st.stage = "done"
        run.save(full=True)
    run.ckpt.remove_blocks()
    log(f"[ppl] final (SPD plan + treatments) {st.ppl['final']}")
    pc = run.cal.pc
    if pc.latency_from is not None:  # not part of the state: a resumed run may add or change it
        run.latency = expected_latency(read_bench(pc.latency_from, run.cal.n_layers, pc.tp), run.sync_plan.n_spd)
        log(f"[latency] {describe(run.latency)}")


STAGES: tuple[tuple[str, Callable[[Run], None]], ...] = (
    ("sensitivity", sensitivity_stage),
    ("head_grouping", head_grouping_stage),
    ("distill", distill_stage),
    ("final_ppl", final_stage),
)
