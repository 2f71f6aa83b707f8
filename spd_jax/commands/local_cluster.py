"""Start N local CPU processes wired through jax.distributed, each with K simulated devices.

  python launch/local_cluster.py --num-processes 2 --devices-per-process 4 -- \\
      python launch/infer.py --tp 8 --model /path/to/model --prompt "Hello"

Each process gets `--coordinator 127.0.0.1:PORT --num-processes N --process-id I` appended to the
command, XLA_FLAGS for K host devices and JAX_PLATFORMS=cpu (or, with --gpus-per-process, its own
GPUs). If any process fails, the others are stopped; the exit code is the first non-zero one.
Process 0's output is shown; the others' only when they fail (--all-output shows all).
The launch scripts' own `--spawn N` does the same for one process per GPU (spd_jax.distributed).
"""

from __future__ import annotations

import argparse
import sys

from spd_jax.distributed import launch_local


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    i = argv.index("--") if "--" in argv else len(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [options] -- COMMAND ...")
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=4)
    p.add_argument("--gpus-per-process", type=int,
                   help="GPU mode: give each process this many GPUs (CUDA_VISIBLE_DEVICES) instead of CPU devices")
    p.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before the whole cluster is stopped")
    p.add_argument("--all-output", action="store_true", help="show every process's output (default: process 0's)")
    args = p.parse_args(argv[:i])
    if i >= len(argv) - 1:
        p.error("give the command to run after '--', e.g. -- python launch/infer.py --tp 8 ...")
    if args.num_processes < 1 or args.devices_per_process < 1 or (args.gpus_per_process or 1) < 1:
        p.error("--num-processes, --devices-per-process and --gpus-per-process must be >= 1")
    return launch_local(argv[i + 1:], args.num_processes, gpus_per_process=args.gpus_per_process,
                        devices_per_process=args.devices_per_process, port=args.port, timeout=args.timeout,
                        quiet_others=not args.all_output)


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
