"""From a RunConfig to a ready model: open weights, pick the SPD blocks, place shards, build a Generator."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from spd_jax.config import ALLREDUCE_MEASURE as MEASURE
from spd_jax.config import ConfigError, RunConfig
from spd_jax.loading import LoadedModel, load_weights, open_engine
from spd_jax.plan import SyncPlan, load_plan
from spd_jax.runtime import Engine, Params


@dataclasses.dataclass
class Session:
    run: RunConfig
    loaded: LoadedModel
    engine: Engine
    params: Params
    plan: SyncPlan
    tokenizer: Any

    @property
    def cfg(self):
        return self.loaded.cfg

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(text, add_special_tokens=True)["input_ids"]
        return list(ids)


def checkpoint_dirs(path: str) -> tuple[Path, Path]:
    """(pipeline output dir holding plan.json, Orbax directory) from either of them."""
    p = Path(path)
    if p.name == "checkpoint":
        return p.parent, p
    return p, p / "checkpoint"


MEASURE_TOKENS = (1, 8, 32, 128, 2048)  # message sizes measured at start-up: this many tokens' hidden states


def allreduce_of(run: RunConfig, mesh=None, hidden: int | None = None):
    """The run's block all-reduce; with `allreduce: auto`, its choice table read from `allreduce_table`, or
    with `allreduce_table: measure` measured now on `mesh` (psum, gather and a2a, in the loop, at the sizes
    of MEASURE_TOKENS tokens' `hidden`-wide states: decode at batch 1/8/32, prefill of 128/2048 tokens)."""
    from spd_jax.collectives import AUTO, METHODS, AllReduce, choice_table

    if run.allreduce != AUTO:
        return AllReduce(run.allreduce, run.allreduce_max_bytes)
    if run.allreduce_table == MEASURE:
        if mesh is None or hidden is None:
            raise ValueError("allreduce_table: measure needs the run's mesh and hidden size")
        from spd_jax.measure import allreduce_microbench
        from spd_jax.generate import hidden_state_bytes

        rows = allreduce_microbench(mesh, tuple(hidden_state_bytes(t, hidden, run.dtype) for t in MEASURE_TOKENS),
                                    repeats=10, methods=METHODS)
        return AllReduce(AUTO, run.allreduce_max_bytes, table=choice_table(rows))
    path = Path(run.allreduce_table)
    if not path.is_file():
        raise ConfigError(f"allreduce_table {path} not found (write one with launch/bench.py --allreduce-methods "
                          f"psum,gather,a2a --json {path})")
    try:
        result = json.loads(path.read_text())
        table = choice_table(result.get("allreduce"))
    except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"allreduce_table {path} is not a usable launch/bench.py result: {e}") from None
    if result.get("tp") != run.tp:
        raise ConfigError(f"allreduce_table {path} was measured at TP {result.get('tp')}, this run is TP {run.tp}: "
                          f"the fastest method depends on the number of ranks")
    return AllReduce(AUTO, run.allreduce_max_bytes, table=table)


def resolve_plan(run: RunConfig, n_layers: int, mesh=None, hidden: int | None = None) -> SyncPlan:
    """The run's SyncPlan: a checkpoint's plan.json, a plan file, or the `spd_blocks` spec (`mesh` and
    `hidden` for an all-reduce table measured at start-up)."""
    bias, how = run.spd_attn_bias, allreduce_of(run, mesh, hidden)
    if run.spd_plan is None and run.checkpoint:
        out, _ = checkpoint_dirs(run.checkpoint)
        if not (out / "plan.json").is_file():
            raise ConfigError(f"{out} has no plan.json next to its checkpoint")
        plan = SyncPlan.from_plan(load_plan(out / "plan.json"), n_layers, bias, where=str(out / "plan.json"))
    elif run.spd_plan:
        plan = SyncPlan.from_plan(load_plan(run.spd_plan), n_layers, bias, where=str(run.spd_plan))
    else:
        plan = SyncPlan.from_spec(run.spd_blocks, n_layers, bias)
    return plan.using(how)


def open_session(run: RunConfig, *, params: Params | None = None, verbose: bool = False,
                 default_layout: bool = True, check=None) -> Session:
    """Load a run's model, plan and weights. default_layout: apply the inference layouts the run does not
    mention (fused projections, folded RMSNorms; `runtime.layout_choice`): True for generation, False for
    evaluation, which keeps the reference layout unless asked. check: called with the model's config before
    any weight loads (e.g. a window against the context), so bad input fails in seconds."""
    loaded, engine = open_engine(run, check)
    plan = resolve_plan(run, loaded.cfg.n_layers, engine.mesh, loaded.cfg.hidden)  # before the weights load
    if verbose and plan.allreduce.table and run.allreduce_table == MEASURE:
        print("auto all-reduce, measured at start-up: " + ", ".join(f"{b} B -> {m}" for b, m in plan.allreduce.table),
              file=sys.stderr)
    if params is None and run.checkpoint:
        from spd_jax.checkpoint import load_checkpoint_params

        params, _ = load_checkpoint_params(checkpoint_dirs(run.checkpoint)[1], engine)
    if params is None:
        params = load_weights(engine, loaded, verbose)
    from spd_jax.runtime import inference_layout, layout_choice

    fused, fold = layout_choice(loaded.cfg, run.fused_projections, run.fold_norms, default_layout)
    engine, params = inference_layout(engine, params, fused=fused, fold=fold)
    run = dataclasses.replace(run, fused_projections=fused, fold_norms=fold)
    return Session(run, loaded, engine, params, plan, loaded.tokenizer())
