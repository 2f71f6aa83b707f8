#!/usr/bin/env python
"""Latency benchmark of SPD vs sync, side by side in one process. Weights are RANDOM (speed only) (thin entry point; the command is `spd_jax.commands.bench`, installed as `spd-bench`)."""

try:
    from spd_jax.commands.bench import entry
except ImportError as e:  # run from a checkout without installing the package
    raise SystemExit(f"error: {e}; install spd-jax first: bash scripts/setup.sh (or pip install -e .)") from None

if __name__ == "__main__":
    entry()
