#!/usr/bin/env python
"""Perplexity and zero-shot multiple-choice accuracy for any model / TP degree / SPD plan / checkpoint (thin entry point; the command is `spd_jax.commands.evaluate`, installed as `spd-evaluate`)."""

try:
    from spd_jax.commands.evaluate import entry
except ImportError as e:  # run from a checkout without installing the package
    raise SystemExit(f"error: {e}; install spd-jax first: bash scripts/setup.sh (or pip install -e .)") from None

if __name__ == "__main__":
    entry()
