#!/usr/bin/env python
"""Serve a model over the OpenAI-compatible HTTP API (thin entry point; the command is `spd_jax.commands.serve`, installed as `spd-serve`)."""

try:
    from spd_jax.commands.serve import entry
except ImportError as e:  # run from a checkout without installing the package
    raise SystemExit(f"error: {e}; install spd-jax first: bash scripts/setup.sh (or pip install -e .)") from None

if __name__ == "__main__":
    entry()
