#!/usr/bin/env python
"""A bounded load run against a running spd-serve on loopback: N requests from C concurrent clients.

  spd-serve --tp 3 --emulate --port 8000 &
  python scripts/bench_serve.py --url http://127.0.0.1:8000 --requests 200 --concurrency 16 --max-tokens 8

Each request streams a completion (greedy) of a distinct prompt; the script reports throughput, p50/p99
latency and time to first token, and the server's own overhead per token: the run's wall time minus the
engine's decode time (the server's `spd_engine_decode_seconds_total` counter, before and after), per generated
token. With C > 1 the queue is never empty, so that difference is what the HTTP layer, queueing hand-off and
detokenisation cost. It checks that every request was answered exactly once (ids unique, none lost), and exits
non-zero otherwise. Standard library only, so it runs wherever the server's clients run.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import threading
import time
import urllib.request


def metric(url: str, name: str) -> float:
    text = urllib.request.urlopen(f"{url}/metrics", timeout=30).read().decode()
    m = re.search(rf"^{name}{{[^}}]*}} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else float("nan")


def one(url: str, model: str, prompt: str, max_tokens: int) -> dict:
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(f"{url}/v1/completions", body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    ttft, ids, text, finish, status = None, set(), "", None, 200
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            for line in r:
                line = line.decode().strip()
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                ev = json.loads(line[6:])
                ids.add(ev["id"])
                ch = ev["choices"][0]
                if ch["text"] and ttft is None:
                    ttft = time.perf_counter() - t0
                text += ch["text"]
                finish = ch["finish_reason"] or finish
    except urllib.error.HTTPError as e:
        status = e.code
    return {"latency_s": time.perf_counter() - t0, "ttft_s": ttft, "ids": ids, "text": text, "finish": finish,
            "status": status}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", default="embedded")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    prompts = [f"Question {i}: what is {i} plus {i}? Answer:" for i in range(args.requests)]
    results: list[dict | None] = [None] * args.requests
    nxt = iter(range(args.requests))
    lock = threading.Lock()

    def client():
        while True:
            with lock:
                i = next(nxt, None)
            if i is None:
                return
            results[i] = one(args.url, args.model, prompts[i], args.max_tokens)

    busy0 = metric(args.url, "spd_engine_decode_seconds_total")
    tok0 = metric(args.url, "spd_generation_tokens_total")
    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    busy = metric(args.url, "spd_engine_decode_seconds_total") - busy0
    tokens = metric(args.url, "spd_generation_tokens_total") - tok0
    ok = [r for r in results if r is not None and r["status"] == 200 and r["finish"] is not None]
    ids = [i for r in ok for i in r["ids"]]
    lat = sorted(r["latency_s"] for r in ok)
    ttft = sorted(r["ttft_s"] for r in ok if r["ttft_s"] is not None)
    q = lambda xs, f: xs[min(len(xs) - 1, int(f * len(xs)))] if xs else float("nan")  # noqa: E731
    out = {"requests": args.requests, "concurrency": args.concurrency, "max_tokens": args.max_tokens,
           "answered": len(ok), "lost": args.requests - len(ok), "duplicate_ids": len(ids) - len(set(ids)),
           "wall_s": wall, "requests_per_s": len(ok) / wall, "tokens": tokens, "tokens_per_s": tokens / wall,
           "latency_p50_s": statistics.median(lat) if lat else None, "latency_p99_s": q(lat, 0.99),
           "ttft_p50_s": statistics.median(ttft) if ttft else None, "ttft_p99_s": q(ttft, 0.99),
           "engine_decode_s": busy, "server_overhead_per_token_ms": 1e3 * (wall - busy) / tokens if tokens else None,
           "engine_decode_per_token_ms": 1e3 * busy / tokens if tokens else None}
    print(f"{out['answered']}/{args.requests} answered ({out['lost']} lost, {out['duplicate_ids']} duplicate ids) "
          f"from {args.concurrency} clients in {wall:.1f} s: {out['requests_per_s']:.2f} req/s, "
          f"{out['tokens_per_s']:.1f} tok/s; latency p50 {out['latency_p50_s']:.3f} s, p99 {out['latency_p99_s']:.3f} s; "
          f"ttft p50 {out['ttft_p50_s']:.3f} s, p99 {out['ttft_p99_s']:.3f} s; engine decode "
          f"{out['engine_decode_per_token_ms']:.2f} ms/token, server overhead {out['server_overhead_per_token_ms']:.2f} "
          f"ms/token")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return 0 if out["lost"] == 0 and out["duplicate_ids"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
