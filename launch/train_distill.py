#!/usr/bin/env python
"""Run the SPD pipeline: sensitivity analysis, ISB/SB/ESB classification, head grouping, block-to-block (thin entry point; the command is `spd_jax.commands.train_distill`, installed as `spd-train-distill`)."""

try:
    from spd_jax.commands.train_distill import entry
except ImportError as e:  # run from a checkout without installing the package
    raise SystemExit(f"error: {e}; install spd-jax first: bash scripts/setup.sh (or pip install -e .)") from None

if __name__ == "__main__":
    entry()
