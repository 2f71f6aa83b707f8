#!/usr/bin/env python
"""The transformers tensor-parallel peer for launch/bench.py (RANDOM weights, LLaMA shapes) (thin entry point; the command is `spd_jax.commands.bench_peer`, installed as `spd-bench-peer`)."""

try:
    from spd_jax.commands.bench_peer import entry
except ImportError as e:  # run from a checkout without installing the package
    raise SystemExit(f"error: {e}; install spd-jax first: bash scripts/setup.sh (or pip install -e .)") from None

if __name__ == "__main__":
    entry()
