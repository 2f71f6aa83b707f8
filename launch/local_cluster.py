#!/usr/bin/env python
"""Start N local CPU processes wired through jax.distributed, each with K simulated devices.

  python launch/local_cluster.py --num-processes 2 --devices-per-process 4 -- \\
      python launch/infer.py --tp 8 --model /path/to/model --prompt "Hello"

Each process gets `--coordinator 127.0.0.1:PORT --num-processes N --process-id I` appended to the
command, XLA_FLAGS for K host devices and JAX_PLATFORMS=cpu. If any process fails, the others are
stopped; the exit code is the first non-zero one.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--" not in argv:
        print("usage: local_cluster.py [options] -- COMMAND ...", file=sys.stderr)
        return 2
    i = argv.index("--")
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--num-processes", type=int, default=2)
    p.add_argument("--devices-per-process", type=int, default=4)
    p.add_argument("--gpus-per-process", type=int,
                   help="GPU mode: give each process this many GPUs (CUDA_VISIBLE_DEVICES) instead of CPU devices")
    p.add_argument("--port", type=int, help="coordinator port (default: a free one)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds before the whole cluster is stopped")
    args = p.parse_args(argv[:i])
    cmd = argv[i + 1:]
    port = args.port or free_port()
    procs = []
    for pid in range(args.num_processes):
        if args.gpus_per_process:
            k = args.gpus_per_process
            env = dict(os.environ, CUDA_VISIBLE_DEVICES=",".join(str(pid * k + j) for j in range(k)))
        else:
            env = dict(os.environ, JAX_PLATFORMS="cpu",
                       XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices_per_process}")
        full = cmd + ["--coordinator", f"127.0.0.1:{port}", "--num-processes", str(args.num_processes),
                      "--process-id", str(pid)]
        procs.append(subprocess.Popen(full, env=env))
    deadline = time.time() + args.timeout
    rc = 0
    while procs:
        for pr in list(procs):
            code = pr.poll()
            if code is None:
                continue
            procs.remove(pr)
            if code and not rc:
                rc = code
                for other in procs:
                    other.terminate()
        if time.time() > deadline:
            for pr in procs:
                pr.kill()
            print("error: local cluster timed out", file=sys.stderr)
            return 124
        time.sleep(0.2)
    return rc


if __name__ == "__main__":
    sys.exit(main())
