"""The SPD pipeline end to end (launch/train_distill.py is a thin wrapper over `run_pipeline`).

Stages: calibration data -> teacher hidden states -> sensitivity (Algorithm 1) -> classes + plan ->
head grouping of the chosen ESB blocks -> block-to-block distillation of the chosen SB/ESB blocks ->
final perplexities -> plan.json, Orbax checkpoint, report.json and PNG plots in --out.

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
from typing import Any, Literal

import jax
import numpy as np

from spd_jax.checkpoint import Checkpointer
from spd_jax.config import ConfigError, ModelSettings, apply_overrides, check_types, from_dict, read_yaml
from spd_jax.data import DataSpec, calibration_tokens, contiguous_sequences, eval_stream
from spd_jax.distributed import is_main_process
from spd_jax.loading import load_params, open_model
from spd_jax.pipeline.analysis import (
    TREATMENT,
    classify,
    order_by_sensitivity,
    select_by_budget,
    select_by_ratio,
    sensitivity,
    thresholds,
)
from spd_jax.pipeline.distill import BlockDistiller, DistillConfig, make_optimizer
from spd_jax.pipeline.grouping import head_group_block
from spd_jax.pipeline.ops import ModelOps
from spd_jax.plan import PLAN_VERSION, SyncPlan, save_plan
from spd_jax.runlock import RunLock
from spd_jax.runtime import Engine, build_model_def


@dataclasses.dataclass
class PipelineConfig(ModelSettings):
    """The pipeline's settings: the model fields every command shares (`config.ModelSettings`: model, tp,
    dtype, emulate, spd_attn_bias), then calibration, sensitivity, selection, head grouping, distillation."""

    data: str = "wiki"
    calib_samples: int = 16
    calib_len: int = 256
    eval_tokens: int = 8192  # held-out split, for the perplexity of each stage
    seed: int = 0
    batch_size: int = 8  # forward batch for hidden states / perplexity
    sensitivity: Literal["cumulative", "isolated"] = "cumulative"  # Algorithm 1 | drop block i alone
    tau1: float | None = None  # absolute thresholds on s_i; None -> relative rule below
    tau2: float | None = None
    tau1_rel: float = 0.005  # tau1 = 0.5% of the calibration perplexity of the unmodified model
    tau2_rel: float = 0.02  # tau2 = 2%
    ratio: float | None = 0.5  # fraction of blocks to drop (least sensitive first)
    max_ppl_increase: float | None = None  # percent; overrides ratio: largest ratio within this budget
    head_grouping: bool = True
    hg_accept: Literal["always", "if_better"] = "if_better"  # always: the paper; if_better: keep if the block's SPD MSE drops
    hg_samples: int = 8
    save_every: int = 25  # distillation steps between checkpoints
    # teacher hidden states ([L+1, N, T, D], 71 GB for LLaMA-2-7B at 128 x 2048): "memory" (each process's
    # RAM) or "disk" (a file per host in OUT/teacher_states, memory-mapped: one copy per host, in the page
    # cache; removed when the run ends)
    teacher_states: Literal["memory", "disk"] = "memory"
    distill: DistillConfig = dataclasses.field(default_factory=DistillConfig)

    def validate(self) -> None:
        check_types(self, "pipeline config")
        self.validate_model_settings()
        self.distill.validate()
        if self.ratio is not None and not 0.0 <= self.ratio <= 1.0:
            raise ConfigError(f"ratio must be in [0, 1], got {self.ratio}")
        if self.ratio is None and self.max_ppl_increase is None:
            raise ConfigError("give either ratio or max_ppl_increase")
        if self.max_ppl_increase is not None and self.max_ppl_increase < 0:
            raise ConfigError(f"max_ppl_increase must be >= 0 (percent), got {self.max_ppl_increase}")
        # the thresholds are checked here once: both absolute or both relative, tau1 < tau2 either way
        if (self.tau1 is None) != (self.tau2 is None):
            raise ConfigError("give both tau1 and tau2 (absolute thresholds on s_i) or neither (then tau1_rel and "
                              f"tau2_rel of the calibration perplexity apply), got tau1={self.tau1}, tau2={self.tau2}")
        if self.tau1 is not None and not self.tau1 < self.tau2:
            raise ConfigError(f"thresholds must satisfy tau1 < tau2, got tau1={self.tau1}, tau2={self.tau2}")
        if not 0 <= self.tau1_rel < self.tau2_rel:
            raise ConfigError(f"thresholds must satisfy 0 <= tau1_rel < tau2_rel, got {self.tau1_rel}, {self.tau2_rel}")
        for n in ("calib_samples", "calib_len", "batch_size", "save_every", "hg_samples", "eval_tokens"):
            if getattr(self, n) < 1:
                raise ConfigError(f"{n} must be >= 1, got {getattr(self, n)}")
        if self.data != "wiki" and not Path(self.data).expanduser().exists():
            raise ConfigError(f"data file not found: {self.data} (give 'wiki' or an existing .txt/.jsonl file "
                              "or saved dataset folder)")
        if self.tp < 2:
            raise ConfigError(f"the SPD pipeline drops the all-reduce between tensor-parallel shards: it needs tp >= 2, "
                              f"got {self.tp} (e.g. --tp 3 --emulate on one CPU, or --config "
                              "configs/spd_smollm2_tp3.yaml)")


# Fields a resumed run may change without changing what it computes.
RESUME_SAFE_FIELDS = ("save_every",)


# Where a pipeline config leaves them unset, the shared model fields take the CPU setting of the embedded
# model (TP 3 emulated on one device) instead of ModelSettings' TP 1, at which there is no sync point to drop.
PIPELINE_DEFAULTS = {"tp": 3, "emulate": True}


def load_pipeline_config(path: str | None, overrides: dict[str, Any]) -> PipelineConfig:
    """The typed YAML loader of the run configs (`spd_jax.config`) over PIPELINE_DEFAULTS, then every field
    validated."""
    data = {**PIPELINE_DEFAULTS, **(read_yaml(path) if path else {})}
    cfg = apply_overrides(from_dict(PipelineConfig, data, str(path or "pipeline config")), overrides)
    cfg.validate()
    return cfg


def config_differences(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """'field: saved -> current' for every field that differs (nested dicts flattened with dots)."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k, "<absent>"), current.get(k, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, f"{prefix}{k}.")
        elif a != b and f"{prefix}{k}" not in RESUME_SAFE_FIELDS:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def _log(msg: str) -> None:
    if is_main_process():
        print(msg, flush=True)


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


def _stage_done(timings: dict, memory: dict, name: str, t0: float) -> None:
    timings[f"{name}_s"] = time.time() - t0
    memory[name] = memory_peaks()
    m = memory[name]
    gpu = "n/a" if m["gpu_peak_gib"] is None else f"{m['gpu_peak_gib']:.1f} GiB"
    _log(f"[stage] {name}: {timings[f'{name}_s']:.1f} s; peak so far: GPU {gpu} per device, host RSS "
         f"{m['host_peak_gib']:.1f} GiB (process 0)")


def _block_of(params, i):
    return params["layers"][i]


def _with_block(params, i, bp):
    layers = dict(params["layers"])  # nnx.to_pure_dict keys layers by int
    layers[i] = bp
    return {**params, "layers": layers}


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


def input_fingerprints(pc: PipelineConfig) -> dict:
    """Content fingerprints of the run's model and data (spd_jax.fingerprint), recorded in its checkpoint."""
    from spd_jax.fingerprint import data_fingerprint, model_fingerprint

    return {"model": model_fingerprint(pc.model), "data": data_fingerprint(pc.data)}


# config fields that name inputs by path: a resume compares their contents (input_fingerprints), not the strings
INPUT_FIELDS = ("model", "data")


def check_resume(saved: dict, pc: PipelineConfig, inputs: dict, out: Path) -> None:
    """Refuse a resume whose settings or input contents differ from those the checkpoint was written with."""
    saved_cfg = saved.get("config")
    if saved_cfg is None:
        raise ConfigError(f"the checkpoint in {out} does not record the config it was written with, so a "
                          "resume cannot be checked; start again in a new --out")
    old_inputs = saved.get("inputs")
    current = dataclasses.asdict(pc)
    if old_inputs is not None:  # compare contents instead of path strings
        saved_cfg = {k: v for k, v in saved_cfg.items() if k not in INPUT_FIELDS}
        current = {k: v for k, v in current.items() if k not in INPUT_FIELDS}
    diff = config_differences(saved_cfg, current)
    if diff:
        raise ConfigError(f"--resume with a config that differs from the one {out} was written with: "
                          f"{'; '.join(diff)}. Resume with the original settings, or start a new --out "
                          f"(only {', '.join(RESUME_SAFE_FIELDS)} may change on resume)")
    if old_inputs is None:
        return  # a checkpoint written before fingerprints were recorded: its paths were compared above
    what = {"model": f"the model files ({pc.model})", "data": f"the calibration data ({pc.data})"}
    changed = [f"{what[k]}: fingerprint {old_inputs.get(k)} -> {inputs[k]}" for k in INPUT_FIELDS
               if old_inputs.get(k) != inputs[k]]
    if changed:
        raise ConfigError(f"--resume: {'; '.join(changed)}: the content changed since {out} was written, so the "
                          f"blocks left would be treated on other inputs than the finished ones. Restore the "
                          f"original files, or start a new --out")


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
    t_start = time.time()
    timings: dict[str, float] = {}
    memory: dict[str, dict] = {}  # peak GPU / host memory after each stage (memory_peaks)

    lm = open_model(pc.model)
    cfg = lm.cfg
    cfg.check_fits(pc.calib_len, "calib_len: a calibration sequence", "lower --calib-len")
    tok = lm.tokenizer()
    mdef = build_model_def(cfg, pc.tp, pc.dtype)
    engine = Engine.create(mdef, emulate=pc.emulate)
    L = cfg.n_layers
    eos = cfg.eos_token_ids[0] if cfg.eos_token_ids else None

    t0 = time.time()
    calib = calibration_tokens(DataSpec(pc.data, pc.calib_samples, pc.calib_len, pc.seed), tok, eos)
    ev = contiguous_sequences(eval_stream(pc.data, tok, eos), pc.calib_len, pc.eval_tokens)
    _stage_done(timings, memory, "data", t0)
    _log(f"[data] calibration {calib.shape[0]}x{calib.shape[1]} tokens (train split), "
         f"evaluation {ev.shape[0]}x{ev.shape[1]} tokens (held-out split) from {pc.data!r}")

    # Teacher hidden states always come from the original weights (also when resuming).
    t0 = time.time()
    orig = load_params(engine, lm.source)
    _stage_done(timings, memory, "load", t0)
    ops = ModelOps(engine, pc.batch_size, pc.spd_attn_bias)
    t0 = time.time()
    store = None
    if pc.teacher_states == "disk":  # file-backed, one copy per host (ModelOps.hidden_states)
        (out / "teacher_states").mkdir(parents=True, exist_ok=True)
        store = str(out / "teacher_states" / "h")
    h_cal = ops.hidden_states(orig, calib, progress, "teacher hidden states (calibration)",
                              None if store is None else store + "_calib")
    h_ev = ops.hidden_states(orig, ev, progress, "teacher hidden states (evaluation)",
                             None if store is None else store + "_eval")
    _stage_done(timings, memory, "hidden_states", t0)

    state: dict[str, Any] = {"tp": pc.tp, "config": dataclasses.asdict(pc), "inputs": inputs, "stage": "start",
                             "hg": {}, "b2b": {}, "b2b_current": None, "ppl": {}, "save": 0, "block_files": {}}
    params = orig
    dc = pc.distill
    distiller = BlockDistiller(ops, dc)
    opt_state = None
    if resume and ckpt.latest() is not None:
        st = ckpt.restore_state()
        if st["stage"] == "done":
            params, state = ckpt.restore(engine)
        else:  # the original weights + every finished block + the block in training
            state = st
            for k, name in state.get("block_files", {}).items():
                params = _with_block(params, int(k), ckpt.restore_block(name, engine, int(k)))
            if state.get("b2b_current"):
                i = state["b2b_current"]["block"]
                steps = dc.epochs * -(-pc.calib_samples // dc.batch_size)
                opt_target = make_optimizer(dc, dc.lr_for(cfg.family), steps).init(_block_of(orig, i))
                bp, opt_state = ckpt.restore_block_in_training(engine, i, opt_target)
                params = _with_block(params, i, bp)
        state["config"] = dataclasses.asdict(pc)  # equal up to RESUME_SAFE_FIELDS (checked by run_pipeline)
        state["inputs"] = inputs  # equal contents (check_resume); recorded also for checkpoints older than that
        _log(f"[resume] from checkpoint {ckpt.latest()} at stage {state['stage']!r}"
             + (f", block {state['b2b_current']['block']} step {state['b2b_current']['step']}"
                if state.get("b2b_current") else ""))

    def save(opt=None, block: int | None = None, full: bool = False):
        """A checkpoint step: the state, plus the block in training (with `opt`) or, at the end, everything."""
        state["save"] += 1
        ckpt.save(state["save"], engine, params if full else None, state, opt,
                  None if block is None else (_block_of(params, block), mdef.specs()["layers"][block]))

    def finish_block(i: int, treatment: str):
        """Block i's new weights are final for `treatment`: written once, then recorded in the state."""
        name = f"block{i:03d}_{treatment}"
        ckpt.save_block(name, engine, i, _block_of(params, i))
        state["block_files"][str(i)] = name

    def ppls(plan, p, what):
        bar = (lambda split: f"perplexity {what} ({split})") if progress and is_main_process() else (lambda _: None)
        return {"calib": ops.ppl(p, h_cal, calib, plan, bar("calibration")),
                "eval": ops.ppl(p, h_ev, ev, plan, bar("evaluation"))}

    # ---- sensitivity, classes, plan
    if "plan" not in state:
        t0 = time.time()
        sens = sensitivity(ops, orig, h_cal, calib, pc.sensitivity, progress=progress,
                           log=None if progress else _log)
        _stage_done(timings, memory, "sensitivity", t0)
        t1, t2 = thresholds(sens.base_ppl, pc.tau1, pc.tau2, pc.tau1_rel, pc.tau2_rel)
        classes = classify(sens.s, t1, t2)
        budget_trials = None
        if pc.max_ppl_increase is not None:
            chosen, budget_trials = select_by_budget(
                sens.s, sens.base_ppl, pc.max_ppl_increase,
                lambda blocks: ops.ppl(orig, h_cal, calib, ops.plan(blocks)))
        else:
            chosen = select_by_ratio(sens.s, pc.ratio)
        zs_plan = ops.plan(chosen)
        state["plan"] = {
            "version": PLAN_VERSION, "model": str(lm.path), "arch": cfg.arch, "tp": pc.tp, "n_layers": L,
            "ratio": len(chosen) / L, "requested_ratio": pc.ratio, "max_ppl_increase": pc.max_ppl_increase,
            "budget_trials": budget_trials,
            "data": {"source": pc.data, "calib_samples": pc.calib_samples, "calib_len": pc.calib_len, "seed": pc.seed},
            "sensitivity_method": sens.method, "base_ppl": sens.base_ppl, "tau1": t1, "tau2": t2,
            "order": order_by_sensitivity(sens.s), "ppl_curve": sens.ppl_curve,
            "blocks": [{"index": i, "mode": zs_plan.modes[i], "sensitivity": sens.s[i],
                        "class": classes[i], "treatment": TREATMENT[classes[i]] if zs_plan.is_spd(i) else None}
                       for i in range(L)],
        }
        state["ppl"]["no_spd"] = ppls(ops.plan([]), orig, "no SPD")
        state["ppl"]["zs"] = ppls(zs_plan, orig, "zero-shot")
        state["stage"] = "planned"
        save()
        _log(f"[plan] {len(chosen)}/{L} blocks dropped: {chosen}; classes ISB/SB/ESB = "
             f"{classes.count('ISB')}/{classes.count('SB')}/{classes.count('ESB')} (tau1={t1:.4g}, tau2={t2:.4g})")
        _log(f"[ppl] no SPD {state['ppl']['no_spd']}; zero-shot {state['ppl']['zs']}")
    plan = state["plan"]
    sync_plan = SyncPlan.from_plan(plan, L, pc.spd_attn_bias, where="pipeline state")
    if is_main_process():
        save_plan(plan, out / "plan.json")

    # ---- head grouping for chosen ESB blocks
    t0 = time.time()
    hg_blocks = [b["index"] for b in plan["blocks"] if b["mode"] == "spd" and b["class"] == "ESB"]
    if pc.head_grouping:
        from tqdm.auto import tqdm

        for i in tqdm(hg_blocks, desc="head grouping", disable=not progress, unit="block"):
            if str(i) in state["hg"]:
                continue
            spec_i = mdef.specs()["layers"][i]
            bp_g = engine.to_global(_block_of(params, i), spec_i)
            bp_new, info = head_group_block(ops.block_graphdef, ops.block_infos, bp_g, h_cal[i][: pc.hg_samples],
                                            cfg, mdef.layout, pc.spd_attn_bias)
            if info["applied"]:
                new_local = engine.from_global(bp_new, spec_i)
                before = distiller.mse(_block_of(params, i), h_cal[i], h_cal[i + 1])
                after = distiller.mse(new_local, h_cal[i], h_cal[i + 1])
                info.update(block_mse_before=before, block_mse_after=after)
                keep = pc.hg_accept == "always" or after < before
                info["kept"] = keep
                if keep:
                    params = _with_block(params, i, new_local)
                    finish_block(i, "hg")
            state["hg"][str(i)] = info
            _log(f"[HG] block {i}: " + (f"groups {info['groups']} -> devices {info['device_of_group']} "
                                        f"({info['scatter']}/{info['match']}), MLP-output norm "
                                        f"{info['mlp_norm_original_layout']:.4g} -> {info['mlp_norm_total']:.4g}, "
                                        f"block MSE {info['block_mse_before']:.4g} -> {info['block_mse_after']:.4g}"
                                        f" ({'kept' if info['kept'] else 'reverted'})"
                                        if info["applied"] else info["reason"]))
            save()
        if hg_blocks and "zs_hg" not in state["ppl"]:
            state["ppl"]["zs_hg"] = ppls(sync_plan, params, "zero-shot + HG")
            _log(f"[ppl] zero-shot + HG {state['ppl']['zs_hg']}")
    _stage_done(timings, memory, "head_grouping", t0)

    # ---- block-to-block distillation for chosen SB/ESB blocks
    t0 = time.time()
    b2b_blocks = [b["index"] for b in plan["blocks"] if b["mode"] == "spd" and b["class"] in ("SB", "ESB")]
    if dc.epochs > 0 and b2b_blocks:
        # distill.inputs: "teacher" (the paper): every block learns on the unmodified model's hidden states;
        # "student": blocks are distilled in order, each on the hidden states the already treated model
        # (SPD plan + distilled/regrouped blocks before it) produces, so it also learns to correct the
        # error accumulated upstream. Targets are the teacher's outputs either way.
        x_student = h_cal[0] if dc.inputs == "student" else None
        done_now = 0  # blocks distilled by this process (the ETA's rate; a resumed run counts from its start)
        for i in range(max(b2b_blocks) + 1):
            if i in b2b_blocks and str(i) not in state["b2b"]:
                x_in = h_cal[i] if x_student is None else x_student
                cur = state.get("b2b_current") or {}
                start_step = cur.get("step", 0) if cur.get("block") == i else 0
                losses = cur.get("losses", []) if cur.get("block") == i else []

                def on_step(step, bp, ost, losses_, initial, i=i):
                    nonlocal params
                    if step % pc.save_every == 0:
                        params = _with_block(params, i, bp)
                        state["b2b_current"] = {"block": i, "step": step, "losses": list(losses_),
                                                "initial_mse": initial}
                        save(ost, block=i)
                        _log(f"[checkpoint] saved block {i} step {step}")

                res = distiller.distill(i, _block_of(params, i), x_in, h_cal[i + 1], start_step=start_step,
                                        opt_state=opt_state if start_step else None, losses=losses,
                                        initial=cur.get("initial_mse") if start_step else None,
                                        on_step=on_step, progress=progress)
                opt_state = None
                params = _with_block(params, i, res.params)
                if res.status == "ok":
                    finish_block(i, "b2b")
                state["b2b"][str(i)] = {"status": res.status, "initial_mse": res.initial_mse,
                                        "final_mse": res.final_mse, "steps": len(res.losses), "losses": res.losses,
                                        "message": res.message, "lr": dc.lr_for(cfg.family), "inputs": dc.inputs}
                state["b2b_current"] = None
                save()
                done_now += 1
                left = sum(str(b) not in state["b2b"] for b in b2b_blocks)
                eta = (time.time() - t0) / done_now * left
                _log(f"[B2B] block {i}: MSE {res.initial_mse:.4g} -> {res.final_mse:.4g} ({res.status})"
                     + (f" {res.message}" if res.message else "")
                     + f"; {len(b2b_blocks) - left}/{len(b2b_blocks)} blocks done"
                     + (f", ETA {eta / 60:.1f} min" if left else ""))
            if x_student is not None and i < max(b2b_blocks):  # the treated model's input to block i + 1
                x_student = ops.apply_block(_block_of(params, i), x_student, sync_plan.is_spd(i))
    _stage_done(timings, memory, "distill", t0)

    t0 = time.time()
    state["ppl"]["final"] = ppls(sync_plan, params, "final")
    _stage_done(timings, memory, "final_ppl", t0)
    state["stage"] = "done"
    save(full=True)
    ckpt.remove_blocks()  # the full parameters are saved: the per-block folders are no longer needed
    _log(f"[ppl] final (SPD plan + treatments) {state['ppl']['final']}")

    status_counts = {s: sum(v["status"] == s for v in state["b2b"].values())
                     for s in sorted({v["status"] for v in state["b2b"].values()})}
    if state["b2b"]:
        kept = status_counts.get("ok", 0)
        _log(f"[B2B] {kept}/{len(state['b2b'])} distilled blocks improved and were kept"
             + (f"; kept the original weights of {len(state['b2b']) - kept} ({status_counts})"
                if kept < len(state["b2b"]) else ""))
    report = {
        "config": dataclasses.asdict(pc), "plan": plan, "ppl": state["ppl"], "head_grouping": state["hg"],
        "distillation": {k: {kk: vv for kk, vv in v.items() if kk != "losses"} for k, v in state["b2b"].items()},
        "distillation_status_counts": status_counts,
        "timings_s": {**timings, "total_s": time.time() - t_start}, "memory_gib": memory,
        "machine": {"platform": platform.platform(), "python": sys.version.split()[0], "jax": jax.__version__,
                    "devices": f"{jax.device_count()}x{jax.devices()[0].device_kind}"},
        "checkpoint": str(out / "checkpoint"),
    }
    if store is not None:  # the teacher states are a cache of this run only
        from spd_jax.distributed import barrier, host_leader_index

        barrier("teacher states no longer read")
        if jax.process_index() == host_leader_index():
            import shutil

            shutil.rmtree(out / "teacher_states", ignore_errors=True)
    if is_main_process():
        (out / "report.json").write_text(json.dumps(report, indent=2))
        (out / "b2b_losses.json").write_text(json.dumps({k: v["losses"] for k, v in state["b2b"].items()}))
        plot_report(report, out)
    return report


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
