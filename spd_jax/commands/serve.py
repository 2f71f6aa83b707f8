"""Serve a model over the OpenAI-compatible HTTP API, with or without Sync-Point Drop.

Examples:
  python launch/serve.py --tp 3 --emulate --spd-plan configs/plans/smollm2_tp3_half.json      # the embedded model
  python launch/serve.py --model /models/Llama-2-7b-hf --tp 4 --spawn 4 --dtype bfloat16 --spd-plan plan.json
  curl http://127.0.0.1:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{"model": "embedded", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0}'

One process drives the run's devices (TP over them, or --emulate on one), or with --spawn N one process per GPU:
process 0 serves HTTP and the others decode in lockstep with it. Requests are queued first in, first out and
decoded one at a time (batch 1). docs/serving.md says what the server does and does not do.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading

from spd_jax.cli import common_model_args, ensure_devices, run_config_from_args, spawn_run

PEER_FAILURE_EXIT_S = 3.0  # after a peer process died: how long process 0 answers 503 before it exits (code 1)


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
    run = run_config_from_args(args, {"generation.attention_kernel": args.attention_kernel})
    sess = open_session(run, verbose=True)
    gen = dataclasses.replace(run.generation, stop_at_eos=True)
    decoder = StreamingDecoder(Generator(sess.engine, sess.params, sess.plan), gen, args.stream_chunk)
    if not args.no_warmup:  # compile prefill and the decode chunks of a short request (every process alike)
        for _ in decoder.stream(sess.encode("Hello"), Sampling(args.default_max_tokens)):
            pass
    engine = ServingEngine(decoder, sess.tokenizer, args.max_queue)
    name = args.served_model_name or str(run.model)
    return create_app(engine, name, sess.cfg.max_position, args.default_max_tokens), engine, name


def main(argv=None) -> int:
    import signal

    args = parse_args(argv)
    if args.spawn is not None:  # one process per GPU; process 0 is told of a failed peer by SIGUSR1
        run = run_config_from_args(args)
        return spawn_run(args, __file__, argv, run.tp, run.emulate, run.model, peer_failure_signal=signal.SIGUSR1)
    ensure_devices(args)
    from spd_jax.distributed import maybe_initialize

    maybe_initialize(args)
    import jax

    app, engine, name = build(args)
    if jax.process_index() != 0:  # decode what process 0 decodes; it says when to stop (SIGTERM goes to it)
        from spd_jax.serving.relay import follow

        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        follow(engine.decoder, engine.relay)
        return 0
    import uvicorn

    if engine.relay.active:
        def peer_failed(*_):  # answer 503 from now on, then leave: the decode waits for a process that is gone
            engine.failure = RuntimeError("a server process died")
            threading.Timer(PEER_FAILURE_EXIT_S, os._exit, args=(1,)).start()

        signal.signal(signal.SIGUSR1, peer_failed)
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
