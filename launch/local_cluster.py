#!/usr/bin/env python
"""Start N local CPU processes wired through jax.distributed, each with K simulated devices (thin entry point; the command is `spd_jax.commands.local_cluster`, installed as `spd-local-cluster`)."""

try:
    from spd_jax.commands.local_cluster import entry
except ImportError as e:  # run from a checkout without installing the package
    raise SystemExit(f"error: {e}; install spd-jax first: bash scripts/setup.sh (or pip install -e .)") from None

if __name__ == "__main__":
    entry()
