"""Where the tests find the BIG-bench task files: the project's own download cache (launch/evaluate.py
--download-bigbench), else a copy beside the checkout; None when neither has them."""

from pathlib import Path

from spd_jax.tasks import bigbench_dir

BIGBENCH = next((d for d in (bigbench_dir(), Path(__file__).resolve().parents[2] / "shared" / "data" / "bigbench")
                 if (d / "social_iqa" / "task.json").is_file()), None)
