"""Shared command-line plumbing for the `launch/` scripts (kept here so the scripts stay thin)."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from typing import Any


def model_flags(p: argparse.ArgumentParser) -> None:
    """The flags that say which model runs and how it is split, the same for every command that loads one
    (infer, evaluate, train_distill); each overrides the YAML config's field of the same name."""
    p.add_argument("--model", help="HF model directory, .gguf file, or 'embedded' (default)")
    p.add_argument("--tp", type=int, help="tensor-parallel degree")
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--emulate", dest="emulate", action="store_true", default=None,
                   help="run the N-way TP maths on one device (vmap over shards) instead of N devices")
    g.add_argument("--no-emulate", dest="emulate", action="store_false", help="real TP over N devices")


def common_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML run config (configs/*.yaml); flags override it")
    model_flags(p)
    p.add_argument("--spd-blocks", help="blocks that drop the attention sync: 'all', 'none', or e.g. '0,2,5-9'")
    p.add_argument("--spd-plan", help="plan.json written by launch/train_distill.py (overrides --spd-blocks)")
    p.add_argument("--checkpoint", help="output dir of launch/train_distill.py: distilled weights + its plan")
    from spd_jax.config import ALLREDUCE_CHOICES

    p.add_argument("--allreduce", choices=ALLREDUCE_CHOICES,
                   help="how the block all-reduces are done: NCCL's psum (default), a one-shot exchange for small "
                        "messages, or auto: per message size the method measured fastest in --allreduce-table "
                        "(docs/benchmarks.md has the measured choice per link)")
    p.add_argument("--allreduce-table", metavar="JSON",
                   help="with --allreduce auto: a launch/bench.py --json result of this link and TP degree, measured "
                        "with --allreduce-methods psum,gather,a2a; or 'measure': time psum, gather and a2a at start-up "
                        "on this run's devices, at the sizes of 1/8/32/128/2048 tokens' hidden states")
    p.add_argument("--fused-projections", action=argparse.BooleanOptionalAction, default=None,
                   help="q/k/v and gate/up as single GEMMs at inference (same maths, fewer kernels); default: on "
                        "for generation, off for evaluation")
    p.add_argument("--fold-norms", action=argparse.BooleanOptionalAction, default=None,
                   help="RMSNorm models: fold each block's norm weights into the projections that read them, "
                        "so the norm's 1/rms scales their outputs (two kernels fewer per block in decode; "
                        "bf16 rounding of the folded weights); default: on for generation of RMSNorm models, "
                        "off for evaluation")
    from spd_jax.distributed import add_distributed_args

    add_distributed_args(p)


def ensure_devices(args: argparse.Namespace) -> None:
    """On a CPU-only host, expose enough simulated devices for --tp (must run before JAX starts)."""
    want = max(int(getattr(args, "tp", None) or 1), 8)
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={want}".strip()


def run_config_from_args(args: argparse.Namespace, extra: dict[str, Any] | None = None):
    from spd_jax.config import load_run_config

    overrides = {"model": args.model, "tp": args.tp, "spd_blocks": args.spd_blocks, "spd_plan": args.spd_plan,
                 "checkpoint": getattr(args, "checkpoint", None),
                 "dtype": args.dtype, "emulate": args.emulate,
                 "fused_projections": getattr(args, "fused_projections", None),
                 "fold_norms": getattr(args, "fold_norms", None),
                 "allreduce": getattr(args, "allreduce", None),
                 "allreduce_table": getattr(args, "allreduce_table", None), **(extra or {})}
    return load_run_config(args.config, overrides)


def spawn_run(args: argparse.Namespace, script: str, argv, tp: int, emulate: bool, model: str | None = None,
              peer_failure_signal: int | None = None):
    """`--spawn N` for a command: the run's TP degree, emulation and (for `model`) the model's heads checked
    before any process starts (distributed.maybe_spawn); returns the processes' exit code, or None (no --spawn)."""
    if getattr(args, "spawn", None) is None:
        return None
    from spd_jax.distributed import maybe_spawn

    cfg = None
    if model is not None:
        from spd_jax.loading import open_model

        cfg = open_model(model).cfg
    return maybe_spawn(args, script, argv, tp=tp, emulate=emulate, model_cfg=cfg, peer_failure_signal=peer_failure_signal)


def check_output_path(path: str | None, flag: str) -> None:
    """Refuse an output file that cannot be written, before any work (nothing is left behind: a probe file
    this creates is removed; an existing file is opened for appending only, never changed)."""
    from pathlib import Path

    from spd_jax.config import ConfigError

    if path is None or path == "-":
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(f"{flag} {p} is a folder, not a file")
    existed = p.exists()
    try:
        with open(p, "a"):
            pass
    except OSError as e:
        raise ConfigError(f"{flag} {p} cannot be written: {e.strerror}") from None
    if not existed:
        p.unlink(missing_ok=True)


def parse_list(text: str, kind: type, flag: str, lo: float | None = None, hi: float | None = None) -> list:
    """A comma-separated flag value as a list of `kind` (int or float), each within [lo, hi]; a ConfigError names
    the flag and the bad item."""
    import math

    from spd_jax.config import ConfigError

    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = kind(part)
        except ValueError:
            raise ConfigError(f"{flag}: {part!r} is not a{'n integer' if kind is int else ' number'} "
                              f"(expected a comma-separated list, e.g. {'8192,1048576' if kind is int else '0,0.5,1'})"
                              ) from None
        if isinstance(v, float) and not math.isfinite(v) or (lo is not None and v < lo) or (hi is not None and v > hi):
            raise ConfigError(f"{flag}: {part} is out of range (allowed: {lo if lo is not None else '-inf'} to "
                              f"{hi if hi is not None else 'inf'})")
        out.append(v)
    if not out:
        raise ConfigError(f"{flag}: empty list")
    return out


def die(e: BaseException) -> None:
    """Print a one-line error for user mistakes; let real bugs keep their traceback."""
    from spd_jax.config import ConfigError
    from spd_jax.config import WeightLoadError

    if isinstance(e, (ConfigError, WeightLoadError)):
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    os_error = next((x for x in _chain(e) if isinstance(x, OSError) and x.filename is not None), None)
    if os_error is not None:  # the file system refused (full, read-only, not a folder, no permission)
        print(f"error: {os_error.filename}: {os_error.strerror or os_error}{_OS_HINTS.get(os_error.errno, '')}",
              file=sys.stderr)
        sys.exit(2)
    raise e


_OS_HINTS = {errno.ENOSPC: " (the disk is full: free space, then run again; a pipeline run continues with --resume)",
             errno.EDQUOT: " (over the disk quota: free space, then run again; a pipeline run continues with --resume)",
             errno.EROFS: " (choose a writable folder)", errno.EACCES: " (no permission: choose another path)",
             errno.ENOTDIR: " (a part of the path is a file, not a folder)"}


def _chain(e: BaseException):
    """e and the exceptions it was raised from or during (libraries wrap OSErrors in their own)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def run(main) -> None:
    """Entry point of a launch script: exit with main()'s code, user errors as one `error:` line.

    A process that joined a jax.distributed cluster leaves it through a barrier before exiting, so the
    coordinator (process 0) does not vanish under the others (gRPC errors at exit)."""
    import signal
    import threading

    def terminated(signum, _frame):  # SIGTERM unwinds like Ctrl-C: `finally` blocks release locks, remove partial folders
        raise SystemExit(128 + signum)

    previous_hook = sys.unraisablehook
    stopped: list[int] = []  # the exit code of a signal whose handler's exception a callback swallowed

    def redeliver(u):  # a signal's handler ran inside a callback (e.g. a gc callback), which swallows exceptions:
        sent = (signal.SIGTERM if isinstance(u.exc_value, SystemExit) and u.exc_value.code == 128 + signal.SIGTERM
                else signal.SIGINT if isinstance(u.exc_value, KeyboardInterrupt) else None)
        if sent is not None:
            # send the signal again from another thread: the handler then runs in the main thread once the
            # callback has returned (a kill from this thread would run it here, inside the hook, swallowed again)
            stopped.append(128 + sent)
            redelivery = threading.Timer(0.01, os.kill, (os.getpid(), sent))
            redelivery.daemon = True
            redelivery.start()
            return
        previous_hook(u)

    sys.unraisablehook = redeliver
    signal.signal(signal.SIGTERM, terminated)
    try:
        code = main()
    except KeyboardInterrupt:  # Ctrl-C: `finally` blocks have run; one line, not a traceback
        print("interrupted", file=sys.stderr)
        sys.exit(128 + signal.SIGINT)
    except Exception as e:  # noqa: BLE001
        die(e)
    if "jax" in sys.modules:
        from spd_jax.distributed import shutdown

        shutdown()
    sys.exit(stopped[0] if stopped else code)  # stopped just as main() returned: the exit code still says so
