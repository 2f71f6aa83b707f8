"""Orbax checkpoints of (distilled) parameters plus pipeline state, saved atomically.

Parameters are always saved in the *global* layout (emulated runs unstack their shards first), so a
checkpoint written on one CPU with `--emulate` is served by real TP on N devices and vice versa. The
layout depends on the TP degree (vocab/MLP padding, kv replication), so a checkpoint records its TP
degree and is only restored at that degree.

Orbax writes each step into a temporary directory and renames it when complete, so a process killed
mid-save leaves the previous checkpoint intact.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spd_jax.config import ConfigError
from spd_jax.runtime import Engine, Params
from spd_jax.sharding import named


# what tensorstore / orbax write into the message when the file system refuses a write
_WRITE_FAILURES = ((errno.ENOSPC, "No space left on device"), (errno.EDQUOT, "Disk quota exceeded"),
                   (errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied"))


class _DropOrbaxErrors(logging.Filter):
    """Orbax logs a failed write with a traceback from each of its threads (7 of them, ~500 lines, for one full
    disk) before raising it; `_writing` re-raises it as one OSError, so those log records are dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.ERROR


@contextlib.contextmanager
def _writing(path: Path):
    """Saving under `path`: a write the file system refused becomes one OSError naming the path and the cause
    (the CLI prints it as one `error:` line); other failures pass unchanged."""
    log = logging.getLogger("absl")
    quiet = _DropOrbaxErrors()
    log.addFilter(quiet)
    try:
        yield
    except Exception as e:  # noqa: BLE001 - orbax/tensorstore wrap OS errors in ValueError and friends
        text = str(e)
        for code, marker in _WRITE_FAILURES:
            if marker in text or f"os_error_code='{code}'" in text:
                raise OSError(code, os.strerror(code), str(path)) from None
        raise
    finally:
        log.removeFilter(quiet)


SPACE_SLACK = 1 << 20  # bytes beyond the arrays a save needs (metadata, the state JSON)


def _ensure_space(path: Path, *trees) -> None:
    """Refuse a save the disk cannot hold before it starts: orbax's failing writers leave tracebacks from
    several threads and a half-written step behind. (`_writing` still turns a disk that fills during the save
    into one error.)"""
    import shutil

    need = SPACE_SLACK + sum(int(a.size) * a.dtype.itemsize for t in trees for a in jax.tree.leaves(t)
                             if hasattr(a, "dtype"))
    probe = path
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < need:
        raise OSError(errno.ENOSPC, f"No space left on device ({need / 2**20:.1f} MiB needed, "
                                    f"{free / 2**20:.1f} MiB free)", str(path))


def _abstract(tree, shardings):
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _optimizer_target(engine: Engine, opt_target: Any):
    """Where the optimizer state is restored: each leaf where the target has it, except leaves the optimizer
    created without a placement (Adam's step count), which `opt.init` leaves on one device: restored there
    they would be committed to it, and a step with weights on all TP devices fails ("incompatible
    devices"); those are replicated over the mesh."""
    def where(a):
        s = a.sharding
        if engine.emulate or (isinstance(s, NamedSharding) and s.mesh == engine.mesh):
            return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s)
        return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=named(engine.mesh, P()))

    return jax.tree.map(where, opt_target)


class Checkpointer:
    """The folder is created by the first save, so a run that fails before it leaves no empty folder."""

    def __init__(self, directory: str | Path, max_to_keep: int = 2):
        self.dir = Path(directory).absolute()
        self.max_to_keep = max_to_keep
        self._mngr = None

    @property
    def mngr(self) -> ocp.CheckpointManager:
        if self._mngr is None:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._mngr = ocp.CheckpointManager(
                self.dir, options=ocp.CheckpointManagerOptions(max_to_keep=self.max_to_keep, create=False))
        return self._mngr

    def latest(self) -> int | None:
        if self._mngr is None and not self.dir.is_dir():
            return None
        return self.mngr.latest_step()

    def save(self, step: int, engine: Engine, params: Params | None, state: dict, opt_state: Any = None,
             block: tuple[Params, Any] | None = None) -> None:
        """One step: the pipeline `state`, and the full `params` (None: not in this step), the optimizer state,
        and `block` = (one block's parameters, their PartitionSpecs): the block in training. A pipeline run
        saves its full parameters once, at the end; while it runs, a step holds the state and the block in
        training, and each finished block goes to its own folder (`save_block`), so a LLaMA-2-7B run writes
        one block (0.4 GB) per save instead of all 13.5 GB."""
        items = {"state": ocp.args.JsonSave(state)}
        if params is not None:
            items["params"] = ocp.args.StandardSave(engine.to_global(params))
        if block is not None:
            items["block"] = ocp.args.StandardSave(engine.to_global(*block))
        if opt_state is not None:
            items["opt"] = ocp.args.StandardSave(opt_state)
        _ensure_space(self.dir, params, block[0] if block is not None else None, opt_state)
        with _writing(self.dir):
            self.mngr.save(step, args=ocp.args.Composite(**items), force=True)
            self.mngr.wait_until_finished()

    def _block_target(self, engine: Engine, index: int):
        return _abstract(engine.mdef.abstract["layers"][index], engine.global_shardings()["layers"][index])

    def save_block(self, name: str, engine: Engine, index: int, bp: Params) -> None:
        """A finished block's parameters under `blocks/<name>` (written once per name, atomically)."""
        path = self.dir / "blocks" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        _ensure_space(path, bp)
        with _writing(path), ocp.StandardCheckpointer() as ck:
            ck.save(path, engine.to_global(bp, engine.mdef.specs()["layers"][index]), force=True)
            ck.wait_until_finished()

    def restore_block(self, name: str, engine: Engine, index: int) -> Params:
        path = self.dir / "blocks" / name
        try:
            with ocp.StandardCheckpointer() as ck:
                bp = ck.restore(path, self._block_target(engine, index))
        except Exception as e:  # orbax raises assorted errors for damaged or missing folders
            raise ConfigError(f"block checkpoint {path} could not be restored: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        return engine.from_global(bp, engine.mdef.specs()["layers"][index])

    def restore_block_in_training(self, engine: Engine, index: int, opt_target: Any, step: int | None = None):
        """(block parameters, optimizer state) of the block in training saved in `step` (default: latest)."""
        step = self.latest() if step is None else step
        items = {"block": ocp.args.StandardRestore(self._block_target(engine, index)),
                 "opt": ocp.args.StandardRestore(_optimizer_target(engine, opt_target))}
        try:
            out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:
            raise ConfigError(f"checkpoint {self.dir} step {step} could not be restored: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        return engine.from_global(out["block"], engine.mdef.specs()["layers"][index]), out["opt"]

    def remove_blocks(self) -> None:
        import shutil

        shutil.rmtree(self.dir / "blocks", ignore_errors=True)

    def restore_state(self, step: int | None = None) -> dict:
        step = self.latest() if step is None else step
        try:
            state = self.mngr.restore(step, args=ocp.args.Composite(state=ocp.args.JsonRestore()))["state"]
        except Exception as e:  # noqa: BLE001 - orbax raises assorted errors for folders it did not write
            raise ConfigError(f"checkpoint {self.dir} step {step} holds no readable pipeline state (is it a "
                              f"launch/train_distill.py output folder?): {type(e).__name__}: "
                              f"{str(e).splitlines()[0][:200] if str(e) else ''}") from None
        if not isinstance(state, dict):
            raise ConfigError(f"checkpoint {self.dir} step {step}: its pipeline state is not a JSON object")
        return state

    def restore(self, engine: Engine, step: int | None = None):
        """The full parameters of a finished run: (params in the engine's layout, state)."""
        step = self.latest() if step is None else step
        if step is None:
            raise ConfigError(f"no checkpoint in {self.dir}")
        state = self.restore_state(step)
        if state.get("tp") is not None and state["tp"] != engine.mdef.tp:
            raise ConfigError(f"checkpoint {self.dir} was written for tp={state['tp']}, not tp={engine.mdef.tp}")
        if state.get("stage", "done") != "done":
            raise ConfigError(f"checkpoint {self.dir} is of a pipeline run that has not finished (stage "
                              f"{state['stage']!r}); finish it with `train_distill.py --resume` first")
        target = _abstract(engine.mdef.abstract, engine.global_shardings())
        items = {"params": ocp.args.StandardRestore(target)}
        try:
            out = self.mngr.restore(step, args=ocp.args.Composite(**items))
        except Exception as e:  # orbax raises assorted errors for damaged or mismatched checkpoints
            raise ConfigError(f"checkpoint {self.dir} step {step} could not be restored: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
        return engine.from_global(out["params"]), state


def load_checkpoint_params(directory: str | Path, engine: Engine) -> tuple[Params, dict]:
    d = Path(directory)
    if not d.exists():
        raise ConfigError(f"checkpoint directory not found: {d}")
    ck = Checkpointer(d)
    if ck.latest() is None:
        raise ConfigError(f"{d} holds no complete checkpoint")
    params, state = ck.restore(engine)
    return params, state
