"""Jitted model operations the SPD pipeline needs, on top of an `Engine` (real or emulated TP).

* hidden states of the all-sync (teacher) model: the input of every block (cached once; blocks
  before i are in sync mode in every configuration Algorithm 1 compares, so h_i is shared);
* mean NLL of running blocks start..L-1 (with given SPD modes) from cached h_start;
* one block's output in sync or SPD mode (for block-to-block distillation).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

from spd_jax.collectives import PSUM, AllReduce
from spd_jax.distributed import to_host
from spd_jax.model import Block, fresh_inputs, vocab_parallel_nll
from spd_jax.plan import SyncPlan
from spd_jax.runtime import Engine, Params


def batches(n: int, batch_size: int):
    for s in range(0, n, batch_size):
        yield slice(s, min(n, s + batch_size))


class ModelOps:
    def __init__(self, engine: Engine, batch_size: int = 8, bias: str = "full"):
        """bias: the SPD bias policy of every plan these operations run (SyncPlan.bias)."""
        self.engine = engine
        self.bias = bias
        self.mdef = engine.mdef
        self.cfg = engine.mdef.cfg
        self.batch_size = batch_size
        self.specs = self.mdef.specs()
        self.block_specs = self.specs["layers"][0]
        cfg, layout, dtype = self.cfg, self.mdef.layout, self.mdef.dtype
        self.block_graphdef = nnx.split(nnx.eval_shape(lambda: Block(cfg, layout, dtype)))[0]
        self.block_infos = self.mdef.infos["layers"][0]
        self._suffix = {}
        self._block = {}

    @property
    def n_layers(self) -> int:
        return self.cfg.n_layers

    def plan(self, spd_blocks) -> SyncPlan:
        """The plan with SPD on `spd_blocks` (an iterable of indices) and this pipeline's bias policy."""
        return SyncPlan.from_blocks(spd_blocks, self.n_layers, self.bias)

    # ---- teacher hidden states
    @functools.cached_property
    def _hidden_fn(self):
        fwd = self.engine.forward(SyncPlan.sync(self.n_layers, self.bias), return_hidden=True)
        return jax.jit(lambda p, t, pad: jnp.stack(fwd(p, t, pad, None, jnp.int32(0))[2]))

    def hidden_states(self, params: Params, tokens_nt: np.ndarray, progress: bool = False,
                      desc: str = "teacher hidden states", store: str | None = None) -> np.ndarray:
        """[L+1, N, T, D] on host, in the model dtype: inputs of blocks 0..L-1 and the last block's output.

        Filled batch by batch into one preallocated array (never a second full copy). With `store` (a file
        path), the array is a file-backed memory map instead of process memory: one process per host writes
        it and every process on that host maps the same file, so N processes of one host hold one copy, in
        the page cache (at LLaMA-2-7B with 128 x 2048 calibration tokens the array is 71 GB; a process per
        GPU holding its own copy ran a 256 GB host out of memory at TP 2)."""
        from tqdm.auto import tqdm

        n, t_len = tokens_nt.shape
        shape = (self.n_layers + 1, n, t_len, self.cfg.hidden)
        dtype = np.dtype(self.mdef.dtype)
        writer = True
        if store is None:
            out = np.empty(shape, dtype)
        else:
            from spd_jax.distributed import host_leader_index

            leader = host_leader_index()
            writer = jax.process_index() == leader
            store = f"{store}.host{leader}"  # one file per host, written by that host's first process
            out = np.memmap(store, dtype, "w+", shape=shape) if writer else None
        for sl in tqdm(list(batches(n, self.batch_size)), desc=desc, disable=not progress, unit="batch"):
            t = tokens_nt[sl]
            pad = np.zeros((len(t),), np.int32)
            h = to_host(self._hidden_fn(params, self.engine.replicate(t), self.engine.replicate(pad)))
            if writer:
                out[:, sl] = h
        if store is not None:
            from spd_jax.distributed import barrier

            if writer:
                out.flush()
                del out
            barrier(f"teacher hidden states {desc}")
            out = np.memmap(store, dtype, "r", shape=shape)
        return out

    # ---- NLL of the suffix of the network, one compiled program per block mode (not per suffix)
    def _run_block_fn(self, mode: str, bias: str, allreduce: AllReduce):
        """Jitted (block_params, x[B,T,D]) -> the block's output, in `mode`. Every block has the same shapes,
        so one program per (mode, bias, all-reduce) serves every block of every suffix: the sensitivity
        analysis compiles two programs instead of one unrolled suffix per block (at LLaMA-2-7B scale the 32
        suffix programs, 528 block bodies in all, took longer to compile than to run)."""
        key = ("run", mode, bias, allreduce)
        if key not in self._suffix:
            f, dtype = self._sharded_block(mode, bias, allreduce), self.mdef.dtype
            self._suffix[key] = jax.jit(lambda bp, x: f(bp, x.astype(dtype)))
        return self._suffix[key]

    @functools.cached_property
    def _head_nll_fn(self):
        """Jitted (params, h[B,T,D], targets[B,T-1], pad) -> summed next-token NLL of the final norm + LM head."""
        graphdef, vocab = self.mdef.graphdef, self.cfg.vocab_size

        def shard(params, h, targets):
            model = nnx.merge(graphdef, params)
            return vocab_parallel_nll(model.logits_local(model.final_norm(h))[:, :-1], targets, vocab)

        f = self.engine.sharded(shard, (self.specs, P(), P()), P())
        return jax.jit(lambda p, h, t: jnp.sum(f(p, h, t)))

    def suffix_nll(self, params: Params, h_start: np.ndarray, tokens_nt: np.ndarray, start: int,
                   plan: SyncPlan, desc: str | None = None) -> float:
        """Mean next-token NLL when blocks start..L-1 run with `plan`, from block input h_start [N,T,D].

        Each batch stays on the devices while it passes the blocks one program call at a time. `desc`: show
        a progress bar (with ETA) under that name."""
        from tqdm.auto import tqdm

        plan = plan.check(self.n_layers)
        total = 0.0
        for sl in tqdm(list(batches(len(tokens_nt), self.batch_size)), desc=desc, disable=desc is None, unit="batch",
                       leave=False):
            t = tokens_nt[sl]
            x = self.engine.replicate(h_start[sl])
            for i in range(start, self.n_layers):
                x = self._run_block_fn(plan.modes[i], plan.bias, plan.allreduce)(params["layers"][i], x)
            total += float(to_host(self._head_nll_fn(params, x, self.engine.replicate(t[:, 1:]))))
        return total / (tokens_nt.shape[0] * (tokens_nt.shape[1] - 1))

    def ppl(self, params, hidden, tokens_nt, plan: SyncPlan, desc: str | None = None) -> float:
        """Perplexity for a full sync plan, starting from the first block that differs from sync."""
        start = plan.first_spd()
        return float(np.exp(self.suffix_nll(params, hidden[start], tokens_nt, start, plan, desc)))

    # ---- one block
    def _sharded_block(self, mode: str, bias: str, allreduce: AllReduce = PSUM):
        """(block_params, x[B,T,D]) -> the block's output on unpadded sequences (unjitted, differentiable)."""
        key = (mode, bias, allreduce)
        if key not in self._block:
            graphdef, cfg = self.block_graphdef, self.cfg

            def shard(bp, x):
                blk = nnx.merge(graphdef, bp)
                rope, mask = fresh_inputs(cfg, x.shape[1], jnp.zeros((x.shape[0],), jnp.int32))
                out, _ = blk(x, rope, mask, None, 0, mode=mode, bias=bias, allreduce=allreduce)
                return out

            self._block[key] = self.engine.sharded(shard, (self.block_specs, P()), P(),
                                                   check_vma=mode != "none" and allreduce.checkable)
        return self._block[key]

    def block_fn(self, spd: bool):
        """(block_params, x[B,T,D]) -> block output [B,T,D] in SPD or sync mode (unjitted, differentiable)."""
        return self._sharded_block("spd" if spd else "sync", self.bias)

    def apply_block(self, bp, x_ntd: np.ndarray, spd: bool) -> np.ndarray:
        """One block's output on host inputs, in batches of `batch_size`, as a host array of x's dtype."""
        f, rep = self._run_block_fn("spd" if spd else "sync", self.bias, PSUM), self.engine.replicate
        return np.concatenate([np.asarray(to_host(f(bp, rep(x_ntd[s:s + self.batch_size]))), x_ntd.dtype)
                               for s in range(0, len(x_ntd), self.batch_size)])
