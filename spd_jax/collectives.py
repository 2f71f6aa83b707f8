"""The all-reduce of the `tp` axis, and latency-optimal alternatives for small messages.

At batch-1 decode every block all-reduce carries one token's hidden state (8-16 KiB): its cost is
latency, not bandwidth. NCCL's ring all-reduce over N ranks pays about 2(N-1) link latencies; a
one-shot exchange (every rank gets every other rank's partial at once, then each sums locally in the
same rank order) pays about one. Methods (all inside `shard_map` / the emulation's `vmap`):

* `psum`: `jax.lax.psum` (XLA -> NCCL all-reduce; ring or tree by NCCL's choice);
* `gather`: `all_gather` of the partials, then a float32 sum over the gathered axis in rank order;
* `a2a`: every rank sends its partial to every rank with one `all_to_all` (NCCL: grouped send/recv to
  all peers at once), then the same float32 sum in rank order.

Every device sums the same N arrays in the same order with the same kernel, so all devices hold
bit-identical results (what replication means; tested). The sum is computed in float32, so it matches
`psum` within the input dtype's rounding (NCCL sums bfloat16 in bfloat16). `gather` keeps `check_vma`'s
replication check (its result is typed replicated); `a2a`'s result is typed device-varying though equal
on every device, so a program using it runs with the check off (`AllReduce.checkable`).

`AllReduce(method, max_bytes)` picks the method per message at trace time: messages of at most
`max_bytes` use `method`, larger ones (prefill) `psum`. The benchmark (`launch/bench.py
--allreduce-methods`) measures every method at 8 KiB / 1 MiB / 64 MiB on the link in use and prints the
choice table; nothing here is guessed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

TP_AXIS = "tp"
METHODS = ("psum", "gather", "a2a")
Method = Literal["psum", "gather", "a2a"]


def _rank_sum(stacked_n):
    """Sum over the leading (rank) axis in rank order, in float32, cast back."""
    acc = stacked_n[0].astype(jnp.float32)
    for i in range(1, stacked_n.shape[0]):
        acc = acc + stacked_n[i].astype(jnp.float32)
    return acc.astype(stacked_n.dtype)


def gather_sum(x, axis_name: str = TP_AXIS):
    return _rank_sum(jax.lax.all_gather(x, axis_name, axis=0, tiled=False))


def a2a_sum(x, axis_name: str = TP_AXIS):
    n = jax.lax.axis_size(axis_name)
    copies = jnp.broadcast_to(x[None], (n, *x.shape))  # the same partial for every peer
    received = jax.lax.all_to_all(copies, axis_name, split_axis=0, concat_axis=0, tiled=False)
    return _rank_sum(received)  # received[j] = rank j's partial


@dataclasses.dataclass(frozen=True)
class AllReduce:
    """How a `tp` all-reduce is done: `method` for messages of at most `max_bytes`, `psum` above."""

    method: Method = "psum"
    max_bytes: int = 1 << 20

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown all-reduce method {self.method!r}; known: {', '.join(METHODS)}")
        if self.max_bytes < 0:
            raise ValueError(f"all-reduce max_bytes must be >= 0, got {self.max_bytes}")

    @property
    def checkable(self) -> bool:
        """Whether shard_map's replication check can type the result (a2a's cannot)."""
        return self.method != "a2a"

    def choose(self, x) -> str:
        nbytes = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        return self.method if nbytes <= self.max_bytes else "psum"

    def __call__(self, x, axis_name: str = TP_AXIS):
        m = self.choose(x)
        if m == "gather":
            return gather_sum(x, axis_name)
        if m == "a2a":
            return a2a_sum(x, axis_name)
        return jax.lax.psum(x, axis_name)


PSUM = AllReduce()
