"""Serve a model over the OpenAI-compatible HTTP API, with or without Sync-Point Drop.

Examples:
  python launch/serve.py --tp 3 --emulate --spd-plan configs/plans/smollm2_tp3_half.json      # the embedded model
  python launch/serve.py --model /models/Llama-2-7b-hf --tp 4 --dtype bfloat16 --spd-plan plan.json --port 8000
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "embedded", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'

One process drives the run's devices (TP over them, or --emulate on one); requests are queued first in, first
out and decoded one at a time (batch 1). See README "Serving" for what the server does not do.
"""

from __future__ import annotations

import argparse
import sys

from spd_jax.cli import common_model_args, ensure_devices, run_config_from_args


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--served-model-name", help="the model name clients send (default: the --model argument)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting at most; more are answered 503")
    p.add_argument("--default-max-tokens", type=int, default=16, help="max_tokens of a request that gives none")
    p.add_argument("--stream-chunk", type=int, default=8,
                   help="decode steps between returns to the host: the streaming granularity, and how soon a "
                        "cancelled request stops")
    p.add_argument("--attention-kernel", choices=["auto", "xla", "pallas"])
    p.add_argument("--no-warmup", action="store_true", help="do not compile a short request before listening")
    return p.parse_args(argv)


def build(args):
    """(FastAPI app, engine, served model name) for parsed arguments: the model loaded once and warmed up."""
    import dataclasses

    from spd_jax.config import ConfigError
    from spd_jax.generate import Generator
    from spd_jax.inference import open_session
    from spd_jax.serving.api import create_app
    from spd_jax.serving.decoder import Sampling, StreamingDecoder
    from spd_jax.serving.engine import ServingEngine

    for name in ("max_queue", "default_max_tokens", "stream_chunk"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 <= args.port < 65536:
        raise ConfigError(f"--port must be in 0..65535, got {args.port}")
    if args.spawn is not None or args.coordinator or args.distributed:
        raise ConfigError("spd-serve runs as one process over this host's devices (--tp N uses N of them); one "
                          "process per GPU (--spawn, jax.distributed) is not supported by the server yet")
    run = run_config_from_args(args, {"generation.attention_kernel": args.attention_kernel})
    sess = open_session(run, verbose=True)
    gen = dataclasses.replace(run.generation, stop_at_eos=True)
    decoder = StreamingDecoder(Generator(sess.engine, sess.params, sess.plan), gen, args.stream_chunk)
    if not args.no_warmup:  # compile prefill and the decode chunks of a short request
        for _ in decoder.stream(sess.encode("Hello"), Sampling(args.default_max_tokens)):
            pass
    engine = ServingEngine(decoder, sess.tokenizer, args.max_queue)
    name = args.served_model_name or str(run.model)
    return create_app(engine, name, sess.cfg.max_position, args.default_max_tokens), engine, name


def main(argv=None) -> int:
    args = parse_args(argv)
    ensure_devices(args)
    import uvicorn

    app, engine, name = build(args)
    engine.start()
    print(f"spd-serve: {name!r} on http://{args.host}:{args.port}/v1 (OpenAI API)", file=sys.stderr, flush=True)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", timeout_graceful_shutdown=None)
    server = uvicorn.Server(config)
    import signal

    # uvicorn handles SIGTERM itself (stop accepting, finish the open requests) and re-raises it once done: a
    # graceful stop then ends here, with exit code 0
    signal.signal(signal.SIGTERM, lambda *_: None)
    server.run()
    engine.stop()
    return 0 if engine.failure is None else 1


def entry() -> None:
    from spd_jax.cli import run

    run(main)


if __name__ == "__main__":
    entry()
