"""Perplexity and zero-shot multiple-choice accuracy for any model / TP degree / SPD plan / checkpoint.

Examples:
  python launch/evaluate.py --download-bigbench            # once: BIG-bench task files from PyPI
  python launch/evaluate.py --tp 3 --emulate --limit 200 --json
  python launch/evaluate.py --tp 3 --emulate --checkpoint runs/smollm2 --tasks social_iqa
  python launch/evaluate.py --model /models/Llama-2-7b-hf --tp 8 --task-file arc_easy.jsonl --task-file piqa.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

from spd_jax.cli import common_model_args, ensure_devices, run_config_from_args, spawn_run


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_model_args(p)
    p.add_argument("--tasks", help="comma-separated BIG-bench task names (default: the five offline tasks when no "
                                   "--task-file is given); 'none' for perplexity only")
    p.add_argument("--task-file", action="append", default=[],
                   help="a BIG-bench task.json or an lm-eval-style .jsonl (ARC, HellaSwag, PIQA, WinoGrande, SciQ, "
                        "LAMBADA); repeatable")
    p.add_argument("--task-dir", action="append", default=[], help="extra directory holding BIG-bench tasks")
    p.add_argument("--limit", type=int, help="at most N examples per task")
    p.add_argument("--ppl-source", default="wiki",
                   help="perplexity text: 'wiki' (its held-out split) or a file (whole, unless --ppl-split eval)")
    p.add_argument("--ppl-file", help="a local .txt/.jsonl file to score (whole, by default)")
    p.add_argument("--ppl-split", choices=["all", "eval"],
                   help="which documents to score: 'all' (default for a file given here) or 'eval' (the held-out "
                        "split of the calibration rule: every 10th document; default for 'wiki')")
    p.add_argument("--ppl-tokens", type=int, default=16384,
                   help="score the first N tokens of the text for perplexity (0: skip perplexity)")
    p.add_argument("--ppl-len", type=int, default=256, help="window length for perplexity")
    p.add_argument("--ppl-stride", type=int,
                   help="tokens between window starts (default: --ppl-len, non-overlapping windows); a smaller stride "
                        "gives every scored token at least ppl-len - stride tokens of context (the transformers "
                        "perplexity guide's sliding window)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="sequences per forward (memory grows with it: the logits; at 4 the embedded model's default "
                        "evaluation peaks at 1.7 GiB, at 8 at 2.1 GiB, in the same time on a 2-core CPU)")
    p.add_argument("--no-agreement", action="store_true",
                   help="skip the comparison with the unmodified model (top-1 agreement, KL) that runs on the "
                        "perplexity text whenever SPD blocks or a checkpoint are in use")
    p.add_argument("--download-bigbench", action="store_true",
                   help="download bigbench==1.0.0 (sdist) with pip and extract the task files, then exit")
    p.add_argument("--json", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.spawn is not None and not args.download_bigbench:
        run = run_config_from_args(args)
        spawned = spawn_run(args, __file__, argv, run.tp, run.emulate, run.model)
        if spawned is not None:
            return spawned
    if args.download_bigbench:
        from spd_jax.tasks import download_bigbench

        for path in download_bigbench():
            print(path)
        return 0
    ensure_devices(args)
    tasks, src, split = check_args(args)  # before the model loads: a bad file fails in seconds
    import jax

    from spd_jax.distributed import is_main_process, maybe_initialize
    from spd_jax.evaluation import Scorer, evaluate_loaded, mean_accuracy, mean_accuracy_stderr
    from spd_jax.inference import open_session

    maybe_initialize(args)
    run = run_config_from_args(args)

    def check(cfg):
        if args.ppl_tokens:
            cfg.check_fits(args.ppl_len, "--ppl-len: a perplexity window", "lower --ppl-len")

    sess = open_session(run, default_layout=False, check=check)
    scorer = Scorer(sess.engine, sess.params, sess.plan, batch_size=args.batch_size)
    out = {"model": str(sess.loaded.path), "tp": run.tp, "emulate": run.emulate,
           "spd_blocks": sess.plan.spd_blocks, "checkpoint": run.checkpoint,
           "devices": f"{jax.device_count()}x{jax.devices()[0].device_kind}"}
    t0 = time.time()
    if args.ppl_tokens:
        out.update(perplexity_and_divergence(args, sess, scorer, src, split))
    results = [evaluate_loaded(scorer, sess.tokenizer, name, fmt, items, sess.cfg.max_position,
                               progress=not (args.no_progress or args.json)) for name, fmt, items in tasks]
    out["tasks"] = {r.name: {"n": r.n, "acc": r.acc, "acc_stderr": r.acc_stderr, "acc_norm": r.acc_norm,
                             "acc_norm_stderr": r.acc_norm_stderr} for r in results}
    if results:
        out["mean_acc"], out["mean_acc_stderr"] = mean_accuracy(results), mean_accuracy_stderr(results)
    out["seconds"] = time.time() - t0
    if is_main_process():
        print(json.dumps(out, indent=2)) if args.json else print_report(out, results)
    return 0


def check_args(args):
    """Every numeric flag, the task files and the perplexity source checked, before any model loads. Returns
    (tasks, perplexity source, split)."""
    from pathlib import Path

    from spd_jax.config import ConfigError
    from spd_jax.tasks import DEFAULT_TASKS, load_task

    for name in ("limit", "batch_size", "ppl_len", "ppl_stride"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
    if args.ppl_tokens < 0:
        raise ConfigError(f"--ppl-tokens must be >= 0 (0 skips perplexity), got {args.ppl_tokens}")
    if args.ppl_len < 2 or (args.ppl_stride or args.ppl_len) > args.ppl_len:
        raise ConfigError(f"--ppl-len must be >= 2 and --ppl-stride at most --ppl-len, got {args.ppl_len} and "
                          f"{args.ppl_stride}")
    if args.tasks is None:
        names = [] if args.task_file else list(DEFAULT_TASKS)
    else:
        names = [t for t in args.tasks.split(",") if t and t != "none"]
    tasks = [load_task(spec, args.limit, [Path(d) for d in args.task_dir]) for spec in names + args.task_file]
    src = args.ppl_file or args.ppl_source
    split = args.ppl_split or ("eval" if src == "wiki" else "all")
    if args.ppl_tokens and src != "wiki" and not Path(src).expanduser().exists():
        raise ConfigError(f"perplexity file not found: {src}")
    return tasks, src, split


def perplexity_and_divergence(args, sess, scorer, src: str, split: str) -> dict:
    """Standard perplexity of the text as one token stream; with SPD or a checkpoint (unless --no-agreement), top-1
    agreement and KL against the unmodified model on the same text in non-overlapping windows."""
    from spd_jax.data import text_tokens
    from spd_jax.evaluation import divergence_from_reference, stream_perplexity

    run = sess.run
    stream = text_tokens(src, sess.tokenizer, split)[: args.ppl_tokens]
    pp = stream_perplexity(scorer, stream, args.ppl_len, args.ppl_stride)
    out = {"perplexity": {"source": src, "split": split, "value": pp.value, "tokens": pp.tokens,
                          "stream_tokens": pp.stream_tokens, "window": pp.window, "stride": pp.stride,
                          "windows": pp.windows, "nll_sum": pp.nll}}
    if not (sess.plan.any_spd or run.checkpoint) or args.no_agreement:
        return out
    n_win = max(1, len(stream) // args.ppl_len)
    windows = stream[: n_win * args.ppl_len].reshape(n_win, -1) if len(stream) >= args.ppl_len else stream[None]
    ref = sess.params  # the same weights with every sync point kept; a checkpoint's original weights,
    if run.checkpoint:  # loaded into the layout this run evaluates (fused / folded or not)
        import dataclasses

        from spd_jax.loading import load_weights
        from spd_jax.runtime import build_model_def, inference_layout

        base = dataclasses.replace(sess.engine, mdef=build_model_def(sess.cfg, run.tp, run.dtype))
        _, ref = inference_layout(base, load_weights(base, sess.loaded), fused=run.fused_projections,
                                  fold=run.fold_norms)
    out["vs_unmodified"] = divergence_from_reference(sess.engine, ref, sess.params, sess.plan, windows,
                                                     batch_size=min(args.batch_size, len(windows)))
    return out


def print_report(out: dict, results) -> None:
    if "perplexity" in out:
        p = out["perplexity"]
        which = "held-out split" if p["split"] == "eval" else "all documents"
        print(f"perplexity ({p['source']}, {which}): {p['value']:.3f} over {p['tokens']} scored tokens of "
              f"{p['stream_tokens']} (one token stream, window {p['window']}, stride {p['stride']})")
    if "vs_unmodified" in out:
        v = out["vs_unmodified"]
        print(f"vs the unmodified model on the same text: top-1 agreement {100 * v['top1_agreement']:.2f}%, "
              f"mean KL {v['kl_mean']:.4f} nats ({v['positions']} positions)")
    for r in results:
        print(f"{r.name:40s} n={r.n:5d}  acc={r.acc:.4f} ± {r.acc_stderr:.4f}  "
              f"acc_norm={r.acc_norm:.4f} ± {r.acc_norm_stderr:.4f}")
    if results:
        print(f"{'mean acc':40s}          {out['mean_acc']:.4f} ± {out['mean_acc_stderr']:.4f}  (± one standard error)")


def entry() -> None:
    from spd_jax.cli import run

    run(main)


if __name__ == "__main__":
    entry()
