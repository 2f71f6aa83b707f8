"""Multi-process / multi-host start-up through `jax.distributed`, and the one-process-per-GPU launcher.

`--spawn N` on any launch script starts N local processes of the same command, wired through
`jax.distributed` (process 0 hosts the coordinator): on a GPU host each process owns one GPU
(`CUDA_VISIBLE_DEVICES`), which is how tensor parallelism is deployed and what every multi-host run
is; on a CPU host each gets its share of simulated devices. Process 0 prints; the others write to a
log file that is shown only if they fail. Every process leaves the cluster through
`jax.distributed.shutdown()` (a barrier), so exits are clean.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import jax


def add_distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (jax.distributed)")
    g.add_argument("--coordinator", help="HOST:PORT of process 0's coordinator service")
    g.add_argument("--num-processes", type=int, help="total number of processes")
    g.add_argument("--process-id", type=int, help="this process's id (0..N-1)")
    g.add_argument("--distributed", action="store_true",
                   help="call jax.distributed.initialize() with cluster auto-detection (SLURM, Open MPI, env vars)")
    g.add_argument("--init-timeout", type=int, default=120, help="seconds to wait for the coordinator")
    g.add_argument("--spawn", type=int, metavar="N",
                   help="start N local processes of this command, one per GPU (on CPU: simulated devices split "
                        "among them), wired through jax.distributed; output from process 0 only")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_gpu_count() -> int:
    """GPUs on this host without starting JAX (which would take GPU memory in the launching process)."""
    if os.environ.get("JAX_PLATFORMS", "").lower() == "cpu" or shutil.which("nvidia-smi") is None:
        return 0
    vis = os.environ.get("CUDA_VISIBLE_DEVICES")
    if vis is not None:
        return len([d for d in vis.split(",") if d.strip() and d.strip() != "-1"])
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for ln in out.splitlines() if ln.startswith("GPU "))


# Process 0 hosts the coordination service; when it stops at exit, process 0's own GPU client logs this
# warning (with gRPC detail lines) although the run has finished: seen after every successful
# one-process-per-GPU run on H200 (docs/benchmarks.md, 2026-11-27). The launcher drops exactly that block.
BENIGN_EXIT_WARNING = b"WatchTasksAsync failed"


def filter_exit_noise(src, dst) -> None:
    """Copy a child's stderr (binary file) to `dst` (binary), dropping the BENIGN_EXIT_WARNING block: its
    line and the detail lines after it up to a blank line or the source location (at most 8). Partial
    lines (progress bars ending in a carriage return) pass through at once."""
    buf, skip = b"", 0
    for chunk in iter(lambda: src.read1(65536), b""):
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for ln in lines:
            if BENIGN_EXIT_WARNING in ln:
                skip = 8
                continue
            if skip:
                skip = 0 if (not ln.strip() or b"grpc_util" in ln) else skip - 1
                continue
            dst.write(ln + b"\n")
        if b"\r" in buf and not skip:
            cut = buf.rindex(b"\r") + 1
            dst.write(buf[:cut])
            buf = buf[cut:]
        dst.flush()
    if buf and not skip:
        dst.write(buf)
        dst.flush()


STOP_GRACE_S = 20.0  # after one process failed, the others get this long to stop before they are killed


def launch_local(cmd: list[str], n: int, *, gpus_per_process: int | None = None, devices_per_process: int = 1,
                 port: int | None = None, timeout: float = 1800, quiet_others: bool = True,
                 peer_failure_signal: int | None = None) -> int:
    """Run `cmd` as n processes wired through jax.distributed (each gets --coordinator/--num-processes/
    --process-id). GPU mode: process i sees GPUs [i*k, (i+1)*k) of the visible ones. CPU mode: each has
    `devices_per_process` simulated devices. If one fails the others are stopped; the exit code is the
    first non-zero one. With `quiet_others`, processes > 0 write to a log shown only when they fail."""
    import signal

    port = port or free_port()
    visible = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    logdir = tempfile.mkdtemp(prefix="spd-jax-procs-") if quiet_others else None
    procs, logs, pump = [], [], None
    for pid in range(n):
        if gpus_per_process:
            k = gpus_per_process
            ids = [visible[j] if visible else str(j) for j in range(pid * k, (pid + 1) * k)]
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(ids))
            # XLA's coordination-service client logs gRPC warnings when the processes leave at slightly
            # different times (seen on GPUs even after the shutdown barrier); show errors only, unless set.
            # (Its absl-logged exit warning ignores this: filter_exit_noise drops that one.)
            env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        else:
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
        full = cmd + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(n), "--process-id", str(pid)]
        out = None
        if logdir and pid > 0:
            out = open(os.path.join(logdir, f"process-{pid}.log"), "w")
        logs.append(out)
        raw = os.environ.get("SPD_JAX_RAW_STDERR") == "1"  # debugging: process 0's stderr unfiltered
        err = subprocess.STDOUT if out else (subprocess.PIPE if pid == 0 and not raw else None)
        procs.append(subprocess.Popen(full, env=env, stdout=out, stderr=err))
        if err is subprocess.PIPE:
            import threading

            pump = threading.Thread(target=filter_exit_noise, args=(procs[-1].stderr, sys.stderr.buffer),
                                    daemon=True)
            pump.start()

    def stop_all(signum, _frame):  # a launcher stopped by `timeout` or Ctrl-C passes it on, then waits a while
        for pr in procs:
            if pr.poll() is None:
                pr.send_signal(signum)
        end = time.time() + STOP_GRACE_S
        while time.time() < end and any(pr.poll() is None for pr in procs):
            time.sleep(0.1)
        for pr in procs:
            if pr.poll() is None:
                pr.kill()
                pr.wait()
        raise SystemExit(0 if all(pr.returncode == 0 for pr in procs) else 128 + signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop_all)
    deadline = time.time() + timeout
    rc, keep_logs = 0, False
    live = list(enumerate(procs))
    while live:
        for i, pr in list(live):
            code = pr.poll()
            if code is None:
                continue
            live.remove((i, pr))
            if code and not rc:
                rc = code
                if logs[i] is not None:  # process 0 printed its own error; another's reaches us as one line
                    logs[i].flush()
                    keep_logs = True
                    why = f"killed by signal {-code}" if code < 0 else _error_line(logs[i].name)
                    print(f"error: process {i} of {n} failed (exit {code}): {why} (its log: {logs[i].name})",
                          file=sys.stderr)
                for j, other in live:  # process 0 may be told in its own way (spd-serve: answer 503, then exit)
                    other.send_signal(peer_failure_signal if j == 0 and peer_failure_signal else signal.SIGTERM)
                deadline = min(deadline, time.time() + STOP_GRACE_S)
        if time.time() > deadline and rc:  # a process waiting in a collective for the failed one never returns
            for _, pr in live:
                pr.kill()
            live = []
            break
        if time.time() > deadline:
            for _, pr in live:
                pr.kill()
            print("error: local processes timed out", file=sys.stderr)
            return 124
        time.sleep(0.2)
    if pump is not None:
        pump.join(timeout=10)
    for f in logs:
        if f is not None:
            f.close()
    if logdir and not keep_logs:
        shutil.rmtree(logdir, ignore_errors=True)
    return rc


def _error_line(log: str) -> str:
    """The `error:` line of a failed process's log (without its prefix), else its last non-empty line."""
    try:
        with open(log, errors="replace") as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return "(its log could not be read)"
    errs = [ln for ln in lines if ln.startswith("error:")]
    if errs:
        return errs[-1][len("error:"):].strip()
    return lines[-1] if lines else "(no output)"


def strip_spawn(argv: list[str]) -> list[str]:
    """argv without `--spawn N` / `--spawn=N`."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--spawn":
            skip = True
        elif not a.startswith("--spawn="):
            out.append(a)
    return out


def maybe_spawn(args: argparse.Namespace, script: str, argv: list[str] | None = None, *, tp: int | None = None,
                emulate: bool = False, model_cfg=None, peer_failure_signal: int | None = None) -> int | None:
    """If `--spawn N` was given, run `script` as N local processes (one per GPU) and return its exit code.

    The combination is checked here, before any process starts: `tp` is the run's TP degree (its flag or
    config), which on GPUs must be N (one GPU per process) and on CPU a multiple of N; `emulate` (TP on one
    device) cannot be spread over processes; `model_cfg` (the model's ModelConfig, where the caller has it) must
    split `tp` ways."""
    from spd_jax.config import ConfigError

    n = getattr(args, "spawn", None)
    if n is None:
        return None
    if n < 1:
        raise ConfigError(f"--spawn must be >= 1 (the number of processes), got {n}")
    if args.coordinator or args.num_processes or args.process_id is not None or args.distributed:
        raise ConfigError("--spawn starts its own processes; do not combine it with --coordinator, "
                          "--num-processes, --process-id or --distributed")
    if emulate:
        raise ConfigError(f"--spawn {n} runs one process per device, but this run emulates TP on one device "
                          "(--emulate, or the config's `emulate: true`): pass --no-emulate")
    tp = tp or getattr(args, "tp", None) or 1
    gpus = local_gpu_count()
    if gpus:
        if tp != n:
            raise ConfigError(f"--spawn {n} runs one process per GPU, so the TP degree must be {n}; it is {tp} "
                              f"(pass --tp {n})")
        if gpus < n:
            raise ConfigError(f"--spawn {n} needs {n} GPUs, {gpus} are visible")
    elif tp < n or tp % n:
        raise ConfigError(f"--spawn {n} on CPU splits the TP degree's {tp} devices among the processes, so the TP "
                          f"degree must be a multiple of {n} (pass --tp {n} or a multiple of it)")
    if model_cfg is not None:
        from spd_jax.sharding import TPLayout

        TPLayout(model_cfg, tp)  # a TP degree the model cannot split fails now, not in every process
    argv = sys.argv[1:] if argv is None else argv
    cmd = [sys.executable, script, *strip_spawn(argv)]
    if gpus:
        return launch_local(cmd, n, gpus_per_process=1, peer_failure_signal=peer_failure_signal)
    return launch_local(cmd, n, devices_per_process=tp // n, peer_failure_signal=peer_failure_signal)


def maybe_initialize(args: argparse.Namespace) -> bool:
    """Initialise jax.distributed when flags or the environment ask for it. Returns True if it did."""
    explicit = args.coordinator is not None or args.num_processes is not None or args.process_id is not None
    if not (explicit or args.distributed):
        return False
    if explicit and None in (args.coordinator, args.num_processes, args.process_id):
        raise SystemExit("error: --coordinator, --num-processes and --process-id must be given together")
    if explicit and args.process_id != 0:
        _wait_for_coordinator(args.coordinator, args.init_timeout)
    # CPU collectives across processes go through gloo (GPU collectives use NCCL regardless). Gloo prints
    # its connection messages on the C-level stdout: send those to stderr, keep Python's stdout for output.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    _c_stdout_to_stderr()
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


def _c_stdout_to_stderr() -> None:
    try:
        sys.stdout.flush()
        real = os.dup(1)
        os.dup2(2, 1)
        sys.stdout = os.fdopen(real, "w", buffering=1)
    except (OSError, ValueError, AttributeError):  # no real file descriptors (embedded interpreters)
        pass


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


def shutdown() -> None:
    """Leave the jax.distributed cluster (a barrier across processes) if this process joined one."""
    try:
        from jax._src import distributed as _dist

        joined = _dist.global_state.client is not None
    except Exception:  # noqa: BLE001 - private API: fall back to asking for the process count
        joined = jax.process_count() > 1
    if joined:
        jax.distributed.shutdown()


def is_main_process() -> bool:
    return jax.process_index() == 0


def host_leader_index() -> int:
    """The lowest process index on this process's host (the one that writes host-local files)."""
    if jax.process_count() == 1:
        return jax.process_index()
    import socket
    import zlib

    import numpy as np
    from jax.experimental import multihost_utils

    me = zlib.crc32(socket.gethostname().encode())
    hosts = np.asarray(multihost_utils.process_allgather(np.int64(me))).reshape(-1)
    return int(np.nonzero(hosts == me)[0][0])


def barrier(name: str) -> None:
    """Wait for every process (no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def to_host(x):
    """A (possibly multi-process) jax.Array as a NumPy array on every process.

    Fully addressable arrays are read directly; otherwise the shards are gathered across processes."""
    import numpy as np

    if getattr(x, "is_fully_addressable", True):
        return np.asarray(jax.device_get(x))
    if x.is_fully_replicated:  # every process holds all of it: no cross-process gather
        return np.asarray(x.addressable_data(0))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
