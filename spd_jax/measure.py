"""Timing of the block all-reduce on this run's devices: what `launch/bench.py` reports, and what
`--allreduce auto --allreduce-table measure` (spd_jax.inference) measures at start-up to choose a method per
message size. Kept apart from the benchmark so that serving and inference import only this."""

from __future__ import annotations

import copy
import time

import jax
import jax.numpy as jnp
import numpy as np


def provenance() -> dict:
    """Where a measurement came from: UTC date, the checkout's commit (with `+dirty` when it has uncommitted
    changes; None outside a git checkout) and the command line, for the result files."""
    import datetime
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    commit = None
    try:
        rev = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if rev.returncode == 0:
            dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                                   capture_output=True, text=True, timeout=10).stdout.strip()
            commit = rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
            "commit": commit, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def host_times(fn, *args, repeats: int) -> list[float]:
    """Seconds per call of a jitted `fn` (device-synchronised), `repeats` times after one warm-up call."""
    fn(*args).block_until_ready()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        ts.append(time.perf_counter() - t0)
    return ts


def ar_chain(mesh, k: int, method: str = "psum"):
    """The microbenchmark's loop: k dependent all-reduces of a [tp, elems] array sharded over "tp" (each scaled
    back by 1/n so values stay finite), or with method "exchange" k ring shifts (ppermute to the next rank).

    k is static, so XLA knows the trip count and (as in the decode loop's fixed-length chunks) needs no
    per-iteration read of the loop predicate by the host. The carry's type changes from device-varying to
    replicated, hence check_vma=False for this microbenchmark only."""
    from jax.sharding import PartitionSpec as P

    from spd_jax.collectives import AllReduce

    n = mesh.devices.size
    if method == "exchange":  # one ring shift: the simplest communication an all-reduce needs
        perm = [(i, (i + 1) % n) for i in range(n)]
        step = lambda c: jax.lax.ppermute(c, "tp", perm)  # noqa: E731
    else:
        how = AllReduce(method, max_bytes=1 << 62)
        step = lambda c: how(c, "tp") * (1.0 / n)  # noqa: E731
    body = lambda a: jax.lax.fori_loop(0, k, lambda _, c: step(c), a)  # noqa: E731
    return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("tp", None), out_specs=P("tp", None),
                                 check_vma=False))


def allreduce_microbench(mesh, sizes_bytes=(8 << 10, 1 << 20, 64 << 20), repeats: int = 20,
                         methods: tuple[str, ...] = (), time_exchange: bool = False) -> list[dict]:
    """Latency and bus bandwidth of a bf16 psum over the tp axis, per message size, measured two ways.

    * `median_us`: one jitted all-reduce timed from the host (includes dispatch and synchronisation);
    * `in_loop_us`: the marginal cost of one all-reduce inside an on-device loop of dependent
      all-reduces, ((time of K+1 iterations) - (time of 1)) / K, the way the decode loop pays for them.
    Bus bandwidth is computed from the in-loop time. `methods`: all-reduce implementations
    (collectives.METHODS) whose in-loop cost is measured the same way (`in_loop_us_by_method`, `fastest`):
    the measured choice table of size x link -> method. `time_exchange`: also the in-loop cost of ONE
    point-to-point exchange of the same message (`one_exchange_us`: a ppermute, every rank sends its buffer to
    the next), the simplest communication an all-reduce needs, as a reference for what one NCCL operation
    costs on the link. It is not a lower bound for NCCL's own all-reduce kernels (measured on 2x H200 over
    NVLink: psum 24.1 us, one exchange 28.3 us at 8 KiB; over sockets at 64 MiB psum is 1.5x faster)."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = mesh.devices.size

    def host_time(fn, *args):  # median seconds per call, after one warm-up call
        return float(np.median(host_times(fn, *args, repeats=repeats)))

    out = []
    for size in sizes_bytes:
        elems = size // 2
        x = jax.device_put(jnp.ones((n, elems), jnp.bfloat16), NamedSharding(mesh, P("tp", None)))
        f = jax.jit(jax.shard_map(lambda a: jax.lax.psum(a, "tp"), mesh=mesh, in_specs=P("tp", None),
                                  out_specs=P(None, None)))

        k_many = 64 if size <= (1 << 20) else 8

        def in_loop(method="psum"):
            t_one, t_many = (host_time(ar_chain(mesh, k, method), x) for k in (1, k_many + 1))
            return max(t_many - t_one, 0.0) / k_many

        t = host_time(f, x)
        t_loop = in_loop()
        busbw = 2 * (n - 1) / n * size / t_loop if n > 1 and t_loop > 0 else float("nan")
        row = {"bytes": size, "median_us": t * 1e6, "in_loop_us": t_loop * 1e6, "bus_GBps": busbw / 1e9}
        if methods:
            row["in_loop_us_by_method"] = {m: (t_loop if m == "psum" else in_loop(m)) * 1e6 for m in methods}
            row["fastest"] = min(row["in_loop_us_by_method"], key=row["in_loop_us_by_method"].get)
        if time_exchange and n > 1:
            row["one_exchange_us"] = in_loop("exchange") * 1e6
        out.append(row)
    return same_on_every_process(out)


def same_on_every_process(rows: list[dict]) -> list[dict]:
    """The microbenchmark rows with process 0's timings on every process.

    Each process times its own calls, so with one process per GPU the numbers differ a little between
    processes; a choice table made from them (`collectives.choice_table`, `auto`) could then pick different
    collectives in different processes, and programs whose collectives do not match hang. Process 0's
    numbers are broadcast to all (float32), and `fastest` is recomputed from them."""
    if jax.process_count() == 1 or not rows:
        return rows
    from jax.experimental import multihost_utils

    slots = []  # (row index, key, method or None) in one fixed order: every process builds the same list
    for i, row in enumerate(rows):
        slots += [(i, k, None) for k in sorted(row) if k not in ("bytes", "fastest", "in_loop_us_by_method")]
        slots += [(i, "in_loop_us_by_method", m) for m in sorted(row.get("in_loop_us_by_method") or {})]
    mine = np.array([rows[i][k] if m is None else rows[i][k][m] for i, k, m in slots], np.float32)
    agreed = np.asarray(multihost_utils.broadcast_one_to_all(mine), np.float64)
    out = copy.deepcopy(rows)
    for (i, k, m), v in zip(slots, agreed.tolist()):
        if m is None:
            out[i][k] = v
        else:
            out[i][k][m] = v
    for row in out:
        if "in_loop_us_by_method" in row:
            row["fastest"] = min(row["in_loop_us_by_method"], key=row["in_loop_us_by_method"].get)
    return out
