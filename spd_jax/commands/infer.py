"""Generate text with a tensor-parallel model, with or without Sync-Point Drop.

Examples:
  python launch/infer.py --tp 3 --prompt "The capital of France is"
  python launch/infer.py --config configs/smollm2_tp3_spd_half.yaml --compare-sync --prompt "The capital of France is"
  python launch/infer.py --tp 3 --spd-blocks all --prompt "The capital of France is" --json
  python launch/infer.py --model /path/to/Llama-2-7b-hf --tp 8 --spd-plan runs/llama7b/plan.json
"""

from __future__ import annotations

import argparse
import json

from spd_jax.cli import common_model_args, ensure_devices, run_config_from_args, spawn_run
from spd_jax.config import ATTENTION_KERNEL_CHOICES


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
    p.add_argument("--attention-kernel", choices=ATTENTION_KERNEL_CHOICES,
                   help="decode attention: masked attention in JAX, our Pallas kernel (spd_jax.kernels), or auto "
                        "(default): the kernel on CUDA GPUs where it applies")
    p.add_argument("--attend-window", type=int,
                   help="decode attends over the filled cache in windows doubling from this many slots (default 256; "
                        "0: the whole allocated cache)")
    p.add_argument("--no-warmup", action="store_true", help="do not compile before the timed run")
    p.add_argument("--compare-sync", action="store_true",
                   help="also generate with every sync point kept (same weights, one process) and print both")
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    run = run_config_from_args(args, {
        "generation.max_new_tokens": args.max_new_tokens, "generation.temperature": args.temperature,
        "generation.top_k": args.top_k, "generation.top_p": args.top_p, "generation.seed": args.seed,
        "generation.decode_chunk": args.decode_chunk, "generation.attend_window": args.attend_window,
        "generation.attention_kernel": args.attention_kernel})
    spawned = spawn_run(args, __file__, argv, run.tp, run.emulate, run.model)
    if spawned is not None:
        return spawned
    ensure_devices(args)
    import jax

    from spd_jax.distributed import is_main_process, maybe_initialize

    maybe_initialize(args)
    from spd_jax.inference import open_session
    from spd_jax.plan import SyncPlan

    sess = open_session(run, verbose=not args.json)
    prompts = args.prompt or ["The capital of France is"]
    ids = [sess.encode(p) for p in prompts]
    L = sess.cfg.n_layers

    def run_plan(plan):
        from spd_jax.generate import Generator

        gen = Generator(sess.engine, sess.params, plan)
        if not args.no_warmup:
            gen.generate(ids, run.generation)  # compile prefill + decode for these shapes
        res = gen.generate(ids, run.generation)
        return res, [sess.tokenizer.decode(t, skip_special_tokens=True) for t in res.tokens]

    res, texts = run_plan(sess.plan)
    sync = run_plan(SyncPlan.sync(L)) if args.compare_sync and sess.plan.any_spd else None
    if not is_main_process():
        return 0
    spd_idx = sess.plan.spd_blocks
    n_ar = sess.plan.block_allreduces
    if args.json:
        print(json.dumps({
            "model": str(sess.loaded.path), "tp": run.tp, "emulate": run.emulate, "dtype": run.dtype,
            "spd_blocks": spd_idx, "n_layers": sess.cfg.n_layers,
            "device": jax.devices()[0].device_kind, "n_devices": jax.device_count(),
            "ttft_s": res.ttft_s, "decode_s": res.decode_s, "decode_tokens": res.decode_tokens,
            "decode_tokens_per_s": res.decode_tokens_per_s, "block_allreduces_per_token": n_ar,
            "allreduce": {"method": sess.plan.allreduce.method, "max_bytes": sess.plan.allreduce.max_bytes,
                          "table": [list(e) for e in sess.plan.allreduce.table] or None},
            "results": [{"prompt": p, "text": t, "token_ids": tok, "prompt_token_ids": i, "finished_eos": f}
                        for p, t, tok, i, f in zip(prompts, texts, res.tokens, ids, res.finished)],
            **({"sync": {"block_allreduces_per_token": 2 * L, "texts": sync[1], "token_ids": sync[0].tokens,
                         "same_tokens": [a == b for a, b in zip(res.tokens, sync[0].tokens)]}} if sync else {}),
        }, indent=2))
    else:
        mode = f"SPD on {len(spd_idx)}/{L} blocks" if spd_idx else "sync (no SPD)"
        print(f"# {sess.loaded.path.name}  tp={run.tp}{' (emulated)' if run.emulate else ''}  {mode}  "
              f"dtype={run.dtype}  devices={jax.device_count()}x{jax.devices()[0].device_kind}")
        for k, (p, t) in enumerate(zip(prompts, texts)):
            if sync:
                a, b = res.tokens[k], sync[0].tokens[k]
                agree = next((j for j, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
                print(f"\n>>> {p}\n[sync, {2 * L} block all-reduces per token]\n{p}{sync[1][k]}"
                      f"\n[{mode}, {n_ar} block all-reduces per token]\n{p}{t}"
                      f"\n[greedy tokens agree: {'all ' if a == b else ''}{agree} of {len(b)}: "
                      f"{sess.tokenizer.decode(b[:agree], skip_special_tokens=True)!r}]")
            else:
                print(f"\n>>> {p}\n{p}{t}")
        print(f"\n# {n_ar} block all-reduces per token (sync: {2 * L}); time to first token {res.ttft_s * 1e3:.1f} ms; "
              f"decode {res.decode_tokens} tokens in {res.decode_s * 1e3:.1f} ms ({res.decode_tokens_per_s:.1f} tok/s"
              f"{', emulated or CPU timings say nothing of GPU speed' if run.emulate or jax.devices()[0].platform == 'cpu' else ''})")
    return 0


def entry() -> None:
    from spd_jax.cli import run

    run(main)


if __name__ == "__main__":
    entry()
