"""Block-to-block distillation (B2B) (docs/design.md, "The SPD pipeline").

Teacher: the original TP block (frozen) — its output on the teacher hidden state h_i is exactly the
all-sync model's h_{i+1}, so targets are the cached hidden states. Student: the SPD block, initialised
from the same weights; only that block's parameters train. Loss: MSE between student output and teacher
output on the same block input. Optax AdamW by default; the step is jitted. A non-finite or diverging
loss stops that block and keeps its original weights.

Guards (docs/spd_pipeline.md, "Distillation guards"):
  * during training, a batch's loss is compared with the *same samples'* loss before training
    (`diverge_factor` times it stops the block): a minibatch loss against the full-data mean would
    stop a block wrongly whenever a heavy-tailed batch comes up;
  * after training, the block's error on the full calibration data (the data its initial error was
    measured on) must be lower than before; otherwise the block keeps its original weights
    (status "worse"), which the pipeline report counts.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from spd_jax.config import ConfigError, check_types
from spd_jax.distributed import to_host


@dataclasses.dataclass
class DistillConfig:
    lr: float | None = None  # None: the family's (arch.Family.distill_lr: 5e-5 LLaMA-like, 1e-6 OPT; the paper's)
    epochs: int = 10
    batch_size: int = 4
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    weight_decay: float = 0.0
    schedule: Literal["constant", "cosine"] = "constant"
    warmup_steps: int = 0
    diverge_factor: float = 10.0  # stop if a batch's loss > factor * the same samples' loss before training
    seed: int = 0
    # teacher: each block learns on the unmodified model's hidden states (the paper); student: blocks in
    # order, each on the treated model's own hidden states (docs/spd_pipeline.md)
    inputs: Literal["teacher", "student"] = "teacher"

    def validate(self, where: str = "distill") -> None:
        check_types(self, where)
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"{where}.lr must be > 0 (or null for the paper's default), got {self.lr}")
        if self.epochs < 0:
            raise ConfigError(f"{where}.epochs must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError(f"{where}.batch_size must be >= 1, got {self.batch_size}")
        if self.weight_decay < 0:
            raise ConfigError(f"{where}.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{where}.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not self.diverge_factor > 1:
            raise ConfigError(f"{where}.diverge_factor must be > 1, got {self.diverge_factor}")

    def lr_for(self, family) -> float:
        """The learning rate: `lr`, or the family's default (spd_jax.arch.Family.distill_lr)."""
        return self.lr if self.lr is not None else family.distill_lr


def make_optimizer(dc: DistillConfig, lr: float, total_steps: int):
    if dc.schedule == "cosine":
        sched = optax.warmup_cosine_decay_schedule(0.0, lr, max(dc.warmup_steps, 0), max(total_steps, 1))
    elif dc.schedule == "constant":
        sched = optax.linear_schedule(0.0, lr, dc.warmup_steps) if dc.warmup_steps > 0 else lr
    else:
        raise ValueError(f"unknown schedule {dc.schedule!r}")
    if dc.optimizer == "adamw":
        return optax.adamw(sched, weight_decay=dc.weight_decay)
    if dc.optimizer == "adam":
        return optax.adam(sched)
    if dc.optimizer == "sgd":
        return optax.sgd(sched)
    raise ValueError(f"unknown optimizer {dc.optimizer!r}")


def epoch_order(n: int, seed: int, block: int, epoch: int) -> np.ndarray:
    """Deterministic sample order, so a resumed run sees exactly the batches an uninterrupted one would."""
    return np.random.RandomState([seed, block, epoch]).permutation(n)


@dataclasses.dataclass
class DistillResult:
    params: dict
    losses: list[float]  # per step
    initial_mse: float
    final_mse: float
    status: str  # "ok" | "nan" | "diverged" | "worse" (the last three keep the original weights)
    message: str = ""


class BlockDistiller:
    def __init__(self, ops, dc: DistillConfig):
        self.ops, self.dc = ops, dc
        self.student = ops.block_fn(spd=True)
        dtype = ops.mdef.dtype

        def sample_errors(bp, x, y):  # [n] mean squared error of each sample
            out = self.student(bp, x.astype(dtype))
            return jnp.mean(jnp.square(out.astype(jnp.float32) - y), axis=tuple(range(1, y.ndim)))

        def loss_fn(bp, x, y):
            return jnp.mean(sample_errors(bp, x, y))

        self.sample_errors = jax.jit(sample_errors)
        self._grad = jax.value_and_grad(loss_fn)
        self._steps = {}

    def _step(self, opt, lr: float, total: int):
        # Keyed by the optimizer's configuration, not its identity: every block builds its own optimizer
        # with the same settings, and must reuse one compiled step.
        key = (self.dc.optimizer, self.dc.schedule, self.dc.weight_decay, self.dc.warmup_steps, lr, total)
        if key not in self._steps:
            grad, tx = self._grad, opt

            def step(bp, opt_state, x, y):
                loss, g = grad(bp, x, y)
                updates, opt_state = tx.update(g, opt_state, bp)
                return optax.apply_updates(bp, updates), opt_state, loss

            self._steps[key] = jax.jit(step, donate_argnums=(0, 1))
        return self._steps[key]

    def errors(self, bp, x_ntd: np.ndarray, y_ntd: np.ndarray) -> np.ndarray:
        """Per-sample MSE of the SPD block `bp` against the teacher outputs, [n] float64."""
        bs, rep = self.dc.batch_size, self.ops.engine.replicate
        return np.concatenate([np.asarray(to_host(self.sample_errors(bp, rep(x_ntd[s:s + bs]), rep(y_ntd[s:s + bs]))),
                                          np.float64) for s in range(0, len(x_ntd), bs)])

    def mse(self, bp, x_ntd: np.ndarray, y_ntd: np.ndarray) -> float:
        return float(np.mean(self.errors(bp, x_ntd, y_ntd)))

    def distill(self, block: int, bp, x_ntd: np.ndarray, y_ntd: np.ndarray, *, start_step: int = 0,
                opt_state=None, losses: list[float] | None = None, initial: float | None = None,
                on_step: Callable[[int, dict, object, list[float]], None] | None = None,
                progress: bool = True) -> DistillResult:
        """Train block `block` (params `bp`) so its SPD output on x matches y. Resumable at `start_step`."""
        dc = self.dc
        n = len(x_ntd)
        steps_per_epoch = -(-n // dc.batch_size)
        total = dc.epochs * steps_per_epoch
        lr = dc.lr_for(self.ops.cfg.family)
        opt = make_optimizer(dc, lr, total)
        step_fn = self._step(opt, lr, total)
        original = bp  # never donated: the step functions work on a copy
        # Per-sample errors before training: the divergence guard compares each batch with these samples'
        # own initial error. Recomputed when resuming (cheap, deterministic: the original weights).
        init_err = self.errors(bp, x_ntd, y_ntd)
        initial = float(np.mean(init_err)) if initial is None else initial
        bp = jax.tree.map(lambda a: a.copy(), bp)  # keeps each array's sharding
        if opt_state is None:
            opt_state = opt.init(bp)
        losses = list(losses or [])
        rep = self.ops.engine.replicate
        bar = tqdm(total=total, initial=start_step, desc=f"B2B block {block}", disable=not progress, unit="step")
        for step in range(start_step, total):
            epoch, k = divmod(step, steps_per_epoch)
            idx = np.sort(epoch_order(n, dc.seed, block, epoch)[k * dc.batch_size:(k + 1) * dc.batch_size])
            bp, opt_state, loss = step_fn(bp, opt_state, rep(x_ntd[idx]), rep(y_ntd[idx]))
            loss = float(to_host(loss))
            losses.append(loss)
            bar.update(1)
            bar.set_postfix(mse=f"{loss:.4g}")
            if not np.isfinite(loss):
                bar.close()
                return DistillResult(original, losses, initial, initial, "nan",
                                     f"B2B block {block}: loss became {loss} at step {step}; kept the original weights")
            batch_initial = float(np.mean(init_err[idx]))
            if loss > dc.diverge_factor * max(batch_initial, 1e-12):
                bar.close()
                return DistillResult(original, losses, initial, initial, "diverged",
                                     f"B2B block {block}: loss {loss:.4g} exceeded {dc.diverge_factor}x the same "
                                     f"samples' initial error {batch_initial:.4g} at step {step} (lr {lr:g}); "
                                     "kept the original weights")
            if on_step is not None:
                on_step(step + 1, bp, opt_state, losses, initial)
        bar.close()
        final = self.mse(bp, x_ntd, y_ntd)
        if not np.isfinite(final):
            return DistillResult(original, losses, initial, initial, "nan",
                                 f"B2B block {block}: final MSE is {final}; kept the original weights")
        if not final < initial:
            return DistillResult(original, losses, initial, initial, "worse",
                                 f"B2B block {block}: final MSE {final:.4g} is not below the initial {initial:.4g} "
                                 f"on the same data (lr {lr:g}); kept the original weights")
        return DistillResult(bp, losses, initial, final, "ok")
