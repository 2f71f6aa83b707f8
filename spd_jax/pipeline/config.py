"""The pipeline's settings: `PipelineConfig` (typed, from YAML + flags, validated once at load) and the checks a
resumed run passes (the same settings and the same input contents as the run it continues)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from spd_jax.config import ConfigError, ModelSettings, apply_overrides, check_types, from_dict, read_yaml
from spd_jax.pipeline.distill import DistillConfig


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
    # a `spd-bench --json` result of this model's shape and TP degree on the target hardware: the report states the
    # latency the chosen plan buys there (pipeline.latency); it changes nothing the pipeline computes
    latency_from: str | None = None

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
        if self.latency_from is not None and not Path(self.latency_from).expanduser().is_file():
            raise ConfigError(f"--latency-from {self.latency_from}: file not found (a spd-bench --json result)")
        if self.tp < 2:
            raise ConfigError(f"the SPD pipeline drops the all-reduce between tensor-parallel shards: it needs tp >= 2, "
                              f"got {self.tp} (e.g. --tp 3 --emulate on one CPU, or --config "
                              "configs/spd_smollm2_tp3.yaml)")


# Fields a resumed run may change without changing what it computes.
RESUME_SAFE_FIELDS = ("save_every", "latency_from")


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
