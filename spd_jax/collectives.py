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
`max_bytes` (default 256 KiB) use `method`, larger ones (prefill) `psum`. The default bound comes from
measurement: at TP 4 the all-to-all is slower than NCCL at 1 MiB on NVLink and over sockets (a 128-token
prefill of LLaMA-2-7B is exactly 1 MiB; with the earlier 1 MiB bound it went through the all-to-all and
its ttft was 53% longer over sockets, docs/benchmarks.md, 2026-11-28).

`AllReduce("auto", table=...)` takes the choice from a measured table instead: `(message bytes, fastest
method)` pairs, as `launch/bench.py --allreduce-methods psum,gather,a2a --json F` records them
(`choice_table` reads F); each message uses the method measured fastest at the nearest measured size
(nearest in log scale). A one-shot method replaces NCCL's psum only where it was measured at least
`AUTO_MARGIN` (10%) faster: over NVLink the three methods lie within ~1-2 us of each other at 8 KiB and
1 MiB, less than the microbenchmark's spread between runs, and such a table would otherwise follow noise (measured:
it picked `gather` for the 1 MiB prefill on differences of ~1 us, docs/benchmarks.md, 2026-11-28).
Nothing here is guessed.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp

from spd_jax.config import ALLREDUCE_CHOICES, ALLREDUCE_METHODS, ConfigError
from spd_jax.config import ALLREDUCE_MAX_BYTES as DEFAULT_MAX_BYTES

TP_AXIS = "tp"
METHODS = ALLREDUCE_METHODS  # the implementations
AUTO = "auto"  # per message size from a measured choice table
AUTO_MARGIN = 0.10  # a one-shot method must be measured this much faster than psum to replace it
Method = Literal[ALLREDUCE_CHOICES]


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
    """How a `tp` all-reduce is done: `method` for messages of at most `max_bytes`, `psum` above; or
    `method="auto"`: the fastest method of `table` at the measured size nearest the message."""

    method: Method = "psum"
    max_bytes: int = DEFAULT_MAX_BYTES
    table: tuple[tuple[int, str], ...] = ()  # auto: (measured message bytes, fastest method), sizes ascending

    def __post_init__(self):
        if self.method not in METHODS + (AUTO,):
            raise ConfigError(f"unknown all-reduce method {self.method!r}; known: {', '.join(METHODS + (AUTO,))}")
        if self.max_bytes < 0:
            raise ConfigError(f"all-reduce max_bytes must be >= 0, got {self.max_bytes}")
        if self.method == AUTO and not self.table:
            raise ConfigError("all-reduce method 'auto' needs a measured choice table (collectives.choice_table)")
        for size, m in self.table:
            if m not in METHODS or size <= 0:
                raise ConfigError(f"bad choice-table entry ({size}, {m!r}): sizes > 0, methods {', '.join(METHODS)}")
        if [s for s, _ in self.table] != sorted({s for s, _ in self.table}):
            raise ConfigError("choice-table sizes must be distinct and ascending")

    @property
    def methods(self) -> frozenset[str]:
        """Every implementation this all-reduce may use."""
        if self.method == AUTO:
            return frozenset(m for _, m in self.table) | {"psum"}
        return frozenset((self.method, "psum"))

    @property
    def checkable(self) -> bool:
        """Whether shard_map's replication check can type the result (a2a's cannot)."""
        return "a2a" not in self.methods

    def choose(self, x) -> str:
        nbytes = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
        if self.method == AUTO:
            return choose_from_table(self.table, nbytes)
        return self.method if nbytes <= self.max_bytes else "psum"

    def __call__(self, x, axis_name: str = TP_AXIS):
        m = self.choose(x)
        if m == "gather":
            return gather_sum(x, axis_name)
        if m == "a2a":
            return a2a_sum(x, axis_name)
        return jax.lax.psum(x, axis_name)


def choose_from_table(table, nbytes: int) -> str:
    """The method of the measured size nearest `nbytes` in log scale (the smaller size on a tie)."""
    lg = math.log2(max(nbytes, 1))
    return min(table, key=lambda e: (abs(math.log2(e[0]) - lg), e[0]))[1]


def choice_table(allreduce_rows, margin: float = AUTO_MARGIN) -> tuple[tuple[int, str], ...]:
    """(bytes, fastest method) per size from the `allreduce` rows of a `launch/bench.py --json` result
    measured with several methods (`--allreduce-methods psum,gather,a2a`). Where psum was timed, another
    method wins only if it is faster by more than `margin` (a fraction of psum's time)."""
    if not 0 <= margin < 1:
        raise ConfigError(f"margin must be in [0, 1), got {margin}")
    table = {}
    for row in allreduce_rows or ():
        by = row.get("in_loop_us_by_method") or {}
        timed = {m: us for m, us in by.items() if m in METHODS and us is not None}
        if timed:
            best = min(timed, key=timed.get)
            if best != "psum" and "psum" in timed and timed[best] > (1 - margin) * timed["psum"]:
                best = "psum"
            table[int(row["bytes"])] = best
    if not table:
        raise ConfigError("no all-reduce timings by method in it: measure them with launch/bench.py "
                         "--allreduce-methods psum,gather,a2a --json FILE (at TP >= 2)")
    return tuple(sorted(table.items()))


PSUM = AllReduce()
