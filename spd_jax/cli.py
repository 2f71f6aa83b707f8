"""Shared command-line plumbing for the `launch/` scripts (kept here so the scripts stay thin)."""

from __future__ import annotations

import argparse
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
    p.add_argument("--allreduce", choices=["psum", "gather", "a2a", "auto"],
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


def die(e: BaseException) -> None:
    """Print a one-line error for user mistakes; let real bugs keep their traceback."""
    from spd_jax.config import ConfigError
    from spd_jax.loading import WeightLoadError

    if isinstance(e, (ConfigError, WeightLoadError, FileNotFoundError)):
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    raise e


def run(main) -> None:
    """Entry point of a launch script: exit with main()'s code, user errors as one `error:` line.

    A process that joined a jax.distributed cluster leaves it through a barrier before exiting, so the
    coordinator (process 0) does not vanish under the others (gRPC errors at exit)."""
    try:
        code = main()
    except Exception as e:  # noqa: BLE001
        die(e)
    if "jax" in sys.modules:
        from spd_jax.distributed import shutdown

        shutdown()
    sys.exit(code)
