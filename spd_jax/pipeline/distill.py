"""Block-to-block distillation (B2B), SPD_METHOD.md section 4.

Teacher: the original TP block (frozen) — its output on the teacher hidden state h_i is exactly the
all-sync model's h_{i+1}, so targets are the cached hidden states. Student: the SPD block, initialised
from the same weights; only that block's parameters train. Loss: MSE between student output and teacher
output on the same block input. Optax AdamW by default; the step is jitted. A non-finite or diverging
loss stops that block and keeps its original weights.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm.auto import tqdm

from spd_jax.distributed import to_host


@dataclasses.dataclass
class DistillConfig:
    lr: float | None = None  # None: 5e-5 for LLaMA-family, 1e-6 for OPT (the paper's values)
    epochs: int = 10
    batch_size: int = 4
    optimizer: str = "adamw"  # adamw | adam | sgd
    weight_decay: float = 0.0
    schedule: str = "constant"  # constant | cosine
    warmup_steps: int = 0
    diverge_factor: float = 10.0  # stop if loss > factor * initial loss
    seed: int = 0

    def lr_for(self, arch: str) -> float:
        return self.lr if self.lr is not None else (1e-6 if arch == "opt" else 5e-5)


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
    status: str  # "ok" | "nan" | "diverged"
    message: str = ""


class BlockDistiller:
    def __init__(self, ops, dc: DistillConfig):
        self.ops, self.dc = ops, dc
        self.student = ops.block_fn(spd=True)
        dtype = ops.mdef.dtype

        def loss_fn(bp, x, y):
            out = self.student(bp, x.astype(dtype))
            return jnp.mean(jnp.square(out.astype(jnp.float32) - y))

        self.loss_fn = jax.jit(loss_fn)
        self._grad = jax.value_and_grad(loss_fn)
        self._steps = {}

    def _step(self, opt):
        key = id(opt)
        if key not in self._steps:
            grad = self._grad

            def step(bp, opt_state, x, y):
                loss, g = grad(bp, x, y)
                updates, opt_state = opt.update(g, opt_state, bp)
                return optax.apply_updates(bp, updates), opt_state, loss

            self._steps[key] = jax.jit(step, donate_argnums=(0, 1))
        return self._steps[key]

    def mse(self, bp, x_ntd: np.ndarray, y_ntd: np.ndarray) -> float:
        tot = 0.0
        bs = self.dc.batch_size
        for s in range(0, len(x_ntd), bs):
            rep = self.ops.engine.replicate
            tot += float(to_host(self.loss_fn(bp, rep(x_ntd[s:s + bs]), rep(y_ntd[s:s + bs])))) * len(x_ntd[s:s + bs])
        return tot / len(x_ntd)

    def distill(self, block: int, bp, x_ntd: np.ndarray, y_ntd: np.ndarray, *, start_step: int = 0,
                opt_state=None, losses: list[float] | None = None, initial: float | None = None,
                on_step: Callable[[int, dict, object, list[float]], None] | None = None,
                progress: bool = True) -> DistillResult:
        """Train block `block` (params `bp`) so its SPD output on x matches y. Resumable at `start_step`."""
        dc = self.dc
        n = len(x_ntd)
        steps_per_epoch = -(-n // dc.batch_size)
        total = dc.epochs * steps_per_epoch
        lr = dc.lr_for(self.ops.cfg.arch)
        opt = make_optimizer(dc, lr, total)
        step_fn = self._step(opt)
        original = bp  # never donated: the step functions work on a copy
        initial = self.mse(bp, x_ntd, y_ntd) if initial is None else initial  # given when resuming
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
            if loss > dc.diverge_factor * max(initial, 1e-12):
                bar.close()
                return DistillResult(original, losses, initial, initial, "diverged",
                                     f"B2B block {block}: loss {loss:.4g} exceeded {dc.diverge_factor}x the initial "
                                     f"{initial:.4g} at step {step} (lr {lr:g}); kept the original weights")
            if on_step is not None:
                on_step(step + 1, bp, opt_state, losses, initial)
        bar.close()
        final = self.mse(bp, x_ntd, y_ntd)
        if not np.isfinite(final):
            return DistillResult(original, losses, initial, initial, "nan",
                                 f"B2B block {block}: final MSE is {final}; kept the original weights")
        return DistillResult(bp, losses, initial, final, "ok")
