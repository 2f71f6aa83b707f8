"""Regenerate docs/results.md: SPD ratio sweep x methods (ZS, ZS+B2B, ZS+B2B+HG) on the embedded model.

  python launch/evaluate.py --download-bigbench     # once (or pass --task-dir with the task files)
  python launch/study.py --limit 60
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from spd_jax.cli import ensure_devices

ROOT = Path(__file__).resolve().parents[2]  # the repository (configs/, docs/)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs/spd_smollm2_tp3.yaml"), help="pipeline config")
    p.add_argument("--ratios", default="0,0.25,0.5,0.75,1")
    p.add_argument("--limit", type=int, default=60, help="examples per task")
    p.add_argument("--task-dir", action="append", default=[], help="directory holding BIG-bench tasks")
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--state", default=".spd-study-state",
                   help="folder for the study's progress (distilled blocks, finished rows): a killed study started "
                        "again with the same settings continues from it; removed when the study ends")
    p.add_argument("--from-json", metavar="JSON",
                   help="rewrite results.md and results.png from a finished study's JSON (e.g. docs/results.json) "
                        "without running anything: for a new table layout")
    args = p.parse_args(argv)
    if args.from_json:
        import json

        from spd_jax.pipeline.study import write_results_md

        study = json.loads(Path(args.from_json).read_text())
        docs = Path(args.docs)
        write_results_md(study, docs / "results.md", docs / "results.png", study.get("command", "python launch/study.py"))
        print(f"wrote {docs / 'results.md'} from {args.from_json}")
        return 0
    ensure_devices(args)
    from spd_jax.pipeline.config import load_pipeline_config
    from spd_jax.pipeline.study import run_study, write_results_md

    pc = load_pipeline_config(args.config, {})
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    from spd_jax.cli import parse_list

    ratios = parse_list(args.ratios, float, "--ratios", 0.0, 1.0)
    cmd = ("python launch/study.py " + " ".join(_public_args(argv if argv is not None else sys.argv[1:]))).strip()
    study = run_study(pc, ratios, args.limit, [Path(d) for d in args.task_dir], docs / "results.json",
                      log=lambda m: print(m, flush=True), state_dir=Path(args.state), command=cmd)
    write_results_md(study, docs / "results.md", docs / "results.png", cmd)
    print(f"wrote {docs / 'results.md'}")
    return 0


def _public_args(argv) -> list[str]:
    """The command line as the docs should show it: without --docs/--state (where this run wrote to)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--docs", "--state"):
            skip = True
        elif not a.startswith(("--docs=", "--state=")):
            out.append(a)
    return out


def entry() -> None:
    from spd_jax.cli import run

    run(main)


if __name__ == "__main__":
    entry()
