#!/usr/bin/env python
"""Generate text with a tensor-parallel model, with or without Sync-Point Drop (thin entry point; the command is `spd_jax.commands.infer`, installed as `spd-infer`)."""

try:
    from spd_jax.commands.infer import entry
except ImportError as e:  # run from a checkout without installing the package
    raise SystemExit(f"error: {e}; install spd-jax first: bash scripts/setup.sh (or pip install -e .)") from None

if __name__ == "__main__":
    entry()
