"""The transformers tensor-parallel peer for launch/bench.py (RANDOM weights, LLaMA shapes).

  # 1. a random-weight checkpoint of the shape (once per machine)
  python launch/bench_peer.py --make-checkpoint /tmp/peer-7b --shape llama2-7b
  # 2. the peer at TP 2 (one process per GPU)
  torchrun --nproc-per-node 2 launch/bench_peer.py --checkpoint /tmp/peer-7b --json peer.json
  # 3. transformers' fastest configuration: static KV cache + torch.compile
  torchrun --nproc-per-node 2 launch/bench_peer.py --checkpoint /tmp/peer-7b --compiled --json peer-compiled.json
Compare with `python launch/bench.py --shape llama2-7b --tp 2 --peer-json peer.json` in the same call.
"""

from __future__ import annotations

import argparse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-checkpoint", metavar="DIR", help="write a random-weight checkpoint of --shape and exit")
    p.add_argument("--shape", default="tiny")
    p.add_argument("--tokenizer", help="with --make-checkpoint: a tokenizer folder to include (vocabulary follows it)")
    p.add_argument("--checkpoint", help="checkpoint directory to benchmark (under torchrun for TP > 1)")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compiled", action="store_true",
                   help="transformers' fastest configuration: static KV cache + torch.compile(mode=reduce-overhead)")
    p.add_argument("--json", help="write the result here (rank 0)")
    args = p.parse_args(argv)
    from spd_jax.peer_hf import make_checkpoint, run_peer, write_result

    if args.make_checkpoint:
        print(make_checkpoint(args.shape, args.make_checkpoint, tokenizer=args.tokenizer))
        return 0
    if not args.checkpoint:
        p.error("give --make-checkpoint DIR or --checkpoint DIR")
    write_result(run_peer(args.checkpoint, args.prompt_len, args.new_tokens, args.repeats, compiled=args.compiled),
                 args.json)
    return 0


def entry() -> None:
    from spd_jax.cli import run

    run(main)


if __name__ == "__main__":
    entry()
