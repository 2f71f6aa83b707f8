"""Run the SPD pipeline: sensitivity analysis, ISB/SB/ESB classification, head grouping, block-to-block
distillation. Writes plan.json, an Orbax checkpoint, report.json and PNG plots into --out.

Examples:
  python launch/train_distill.py --config configs/spd_smollm2_tp3.yaml --out runs/smollm2
  python launch/train_distill.py --config configs/spd_smollm2_tp3.yaml --out runs/smollm2 --resume
  python launch/train_distill.py --model /models/Llama-2-7b-hf --tp 8 --no-emulate --ratio 0.75 --out runs/l7
  python launch/infer.py --tp 3 --checkpoint runs/smollm2 --prompt "The capital of France is"
"""

from __future__ import annotations

import argparse

from spd_jax.cli import ensure_devices, model_flags, spawn_run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML pipeline config (configs/spd_*.yaml)")
    model_flags(p)  # --model --tp --dtype --emulate/--no-emulate, as every command that loads a model
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data", help="'wiki' (offline default), a .txt/.jsonl file, or a saved HF dataset dir")
    p.add_argument("--calib-samples", type=int)
    p.add_argument("--calib-len", type=int)
    p.add_argument("--eval-tokens", type=int)
    p.add_argument("--ratio", type=float, help="fraction of blocks whose attention sync is dropped")
    p.add_argument("--max-ppl-increase", type=float, metavar="PCT",
                   help="drop as many syncs as keep calibration perplexity within +PCT%% (overrides --ratio)")
    p.add_argument("--latency-from", metavar="JSON",
                   help="a spd-bench --json result of this model's shape and TP degree on the target hardware (e.g. "
                        "--spd-ratios 0,0.25,0.5,0.75,1): the report states the latency the chosen plan buys there")
    p.add_argument("--tau1", type=float)
    p.add_argument("--tau2", type=float)
    p.add_argument("--sensitivity", choices=["cumulative", "isolated"])
    p.add_argument("--epochs", type=int, help="B2B epochs")
    p.add_argument("--lr", type=float, help="B2B learning rate")
    p.add_argument("--distill-batch-size", type=int)
    p.add_argument("--distill-inputs", choices=["teacher", "student"],
                   help="B2B inputs: the unmodified model's hidden states (teacher, the paper) or, block by block "
                        "in order, the treated model's own (student)")
    p.add_argument("--save-every", type=int, help="B2B steps between checkpoints")
    p.add_argument("--teacher-states", choices=["memory", "disk"],
                   help="teacher hidden states in each process's memory, or memory-mapped from a file per host "
                        "in --out (one copy per host; for large models and one process per GPU)")
    p.add_argument("--no-head-grouping", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    from spd_jax.distributed import add_distributed_args

    add_distributed_args(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from spd_jax.pipeline.config import load_pipeline_config
    from spd_jax.pipeline.run import run_pipeline

    pc = load_pipeline_config(args.config, {
        "model": args.model, "tp": args.tp, "data": args.data, "calib_samples": args.calib_samples,
        "calib_len": args.calib_len, "eval_tokens": args.eval_tokens, "ratio": args.ratio,
        "max_ppl_increase": args.max_ppl_increase, "tau1": args.tau1, "tau2": args.tau2,
        "sensitivity": args.sensitivity, "dtype": args.dtype, "emulate": args.emulate,
        "head_grouping": False if args.no_head_grouping else None,
        "distill.epochs": args.epochs, "distill.lr": args.lr,
        "distill.batch_size": args.distill_batch_size, "distill.inputs": args.distill_inputs, "save_every": args.save_every,
        "teacher_states": args.teacher_states, "latency_from": args.latency_from})
    spawned = spawn_run(args, __file__, argv, pc.tp, pc.emulate, pc.model)
    if spawned is not None:
        return spawned
    ensure_devices(args)
    from spd_jax.distributed import maybe_initialize

    maybe_initialize(args)
    report = run_pipeline(pc, args.out, resume=args.resume, progress=not args.no_progress)
    from spd_jax.distributed import is_main_process

    if is_main_process():
        print(f"done in {report['timings_s']['total_s']:.0f}s: {args.out}/plan.json, report.json, "
              f"sensitivity.png, perplexity.png, checkpoint/")
    return 0


def entry() -> None:
    from spd_jax.cli import run

    run(main)


if __name__ == "__main__":
    entry()
