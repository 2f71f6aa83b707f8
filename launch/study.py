#!/usr/bin/env python
"""Regenerate docs/results.md: SPD ratio sweep x methods (ZS, ZS+B2B, ZS+B2B+HG) on the embedded model (thin entry point; the command is `spd_jax.commands.study`, installed as `spd-study`)."""

try:
    from spd_jax.commands.study import entry
except ImportError as e:  # run from a checkout without installing the package
    raise SystemExit(f"error: {e}; install spd-jax first: bash scripts/setup.sh (or pip install -e .)") from None

if __name__ == "__main__":
    entry()
