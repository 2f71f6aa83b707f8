#!/usr/bin/env python
"""Generate text with a tensor-parallel model, with or without Sync-Point Drop.

Examples:
  python launch/infer.py --tp 3 --prompt "The capital of France is"
  python launch/infer.py --tp 3 --spd-blocks all --prompt "The capital of France is" --json
  python launch/infer.py --model /path/to/Llama-2-7b-hf --tp 8 --spd-plan runs/llama7b/plan.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from spd_jax.cli import common_model_args, ensure_devices, run_config_from_args  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_model_args(p)
    p.add_argument("--prompt", action="append", help="prompt text (repeat for a batch)")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float, help="0 = greedy")
    p.add_argument("--top-k", type=int)
    p.add_argument("--top-p", type=float)
    p.add_argument("--seed", type=int)
    p.add_argument("--decode-chunk", type=int, help="decode steps between checks of the stop condition (default 8)")
    p.add_argument("--no-warmup", action="store_true", help="do not compile before the timed run")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    ensure_devices(args)
    import jax

    from spd_jax.distributed import is_main_process, maybe_initialize

    maybe_initialize(args)
    run = run_config_from_args(args, {
        "generation.max_new_tokens": args.max_new_tokens, "generation.temperature": args.temperature,
        "generation.top_k": args.top_k, "generation.top_p": args.top_p, "generation.seed": args.seed,
        "generation.decode_chunk": args.decode_chunk})
    from spd_jax.inference import open_session

    sess = open_session(run, verbose=not args.json)
    prompts = args.prompt or ["The capital of France is"]
    ids = [sess.encode(p) for p in prompts]
    gen = sess.generator()
    if not args.no_warmup:
        gen.generate(ids, run.generation)  # compile prefill + decode for these shapes
    res = gen.generate(ids, run.generation)
    texts = [sess.tokenizer.decode(t, skip_special_tokens=True) for t in res.tokens]
    if not is_main_process():
        return 0
    spd_idx = [i for i, m in enumerate(sess.spd_modes) if m]
    if args.json:
        print(json.dumps({
            "model": str(sess.loaded.path), "tp": run.tp, "emulate": run.emulate, "dtype": run.dtype,
            "spd_blocks": spd_idx, "n_layers": sess.cfg.n_layers,
            "device": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
            "ttft_s": res.ttft_s, "decode_s": res.decode_s, "decode_tokens": res.decode_tokens,
            "decode_tokens_per_s": res.decode_tokens_per_s,
            "results": [{"prompt": p, "text": t, "token_ids": tok, "prompt_token_ids": i, "finished_eos": f}
                        for p, t, tok, i, f in zip(prompts, texts, res.tokens, ids, res.finished)],
        }, indent=2))
    else:
        mode = f"SPD on {len(spd_idx)}/{sess.cfg.n_layers} blocks" if spd_idx else "sync (no SPD)"
        print(f"# {sess.loaded.path.name}  tp={run.tp}{' (emulated)' if run.emulate else ''}  {mode}  "
              f"dtype={run.dtype}  devices={jax.device_count()}x{jax.devices()[0].device_kind}")
        for p, t in zip(prompts, texts):
            print(f"\n>>> {p}\n{p}{t}")
        print(f"\n# time to first token {res.ttft_s * 1e3:.1f} ms; decode {res.decode_tokens} tokens in "
              f"{res.decode_s * 1e3:.1f} ms ({res.decode_tokens_per_s:.1f} tok/s)")
    return 0


if __name__ == "__main__":
    from spd_jax.cli import run

    run(main)
