"""Multi-process / multi-host start-up through `jax.distributed` (the existing engine)."""

from __future__ import annotations

import argparse
import os

import jax

ENV_HINTS = ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES")


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator service")
    g.add_argument("--num-processes", type=int, help="total number of processes")
    g.add_argument("--process-id", type=int, help="this process's id (0..N-1)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with cluster auto-detection (SLURM, Open MPI, env vars)")
    g.add_argument("--init-timeout", type=int, default=120, help="seconds to wait for the coordinator")


def maybe_initialize(args: argparse.Namespace) -> bool:
    """Initialise jax.distributed when flags or the environment ask for it. Returns True if it did."""
    explicit = args.coordinator is not None or args.num_processes is not None or args.process_id is not None
    if not (explicit or args.distributed):
        return False
    if explicit and None in (args.coordinator, args.num_processes, args.process_id):
        raise SystemExit("error: --coordinator, --num-processes and --process-id must be given together")
    if explicit and args.process_id != 0:
        _wait_for_coordinator(args.coordinator, args.init_timeout)
    # CPU collectives across processes go through gloo (GPU collectives use NCCL regardless).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = dict(initialization_timeout=args.init_timeout)
    if explicit:
        kwargs.update(coordinator_address=args.coordinator, num_processes=args.num_processes,
                      process_id=args.process_id)
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # noqa: BLE001 - surface a clear message instead of a gRPC traceback
        where = args.coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS", "auto-detected address")
        raise SystemExit(f"error: could not join the jax.distributed cluster at {where} within "
                         f"{args.init_timeout}s: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from None
    return True


def _wait_for_coordinator(address: str, timeout: float) -> None:
    """Fail clearly within `timeout` when the coordinator is unreachable: XLA's client otherwise aborts
    the whole process from C++ when its deadline passes, without a Python exception."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, int(port)), timeout=2):
                return
        except (OSError, ValueError) as e:
            last = e
            time.sleep(0.5)
    raise SystemExit(f"error: could not join the jax.distributed cluster at {address} within {timeout}s: "
                     f"the coordinator (process 0) is not reachable ({last})")


def is_main_process() -> bool:
    return jax.process_index() == 0


def to_host(x):
    """A (possibly multi-process) jax.Array as a NumPy array on every process.

    Fully addressable arrays are read directly; otherwise the shards are gathered across processes."""
    import numpy as np

    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
