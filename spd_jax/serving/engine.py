"""The serving loop: one worker thread owns the model and decodes queued requests first in, first out, at
batch 1 (the latency SPD is for). The HTTP side (`serving.api`) submits requests and reads their events.

A request's events are ("delta", text, n_tokens), then ("done", finish_reason) or ("error", message). A
cancelled request (its client went away) is dropped at its next decode chunk. The queue is bounded: a full
queue refuses new requests at once (`QueueFull`), and `stop()` lets the queued and running requests finish.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
import time
from typing import Callable

from spd_jax.serving.decoder import Sampling, StreamingDecoder


class QueueFull(Exception):
    pass


@dataclasses.dataclass
class Request:
    prompt: list[int]
    sampling: Sampling
    stop: tuple[str, ...] = ()
    emit: Callable[[tuple], None] = print  # called from the worker thread with each event
    cancelled: threading.Event = dataclasses.field(default_factory=threading.Event)
    id: int = 0
    t_submit: float = 0.0
    completion_tokens: int = 0


# Prometheus histogram buckets (seconds)
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        self.sum, self.n = self.sum + v, self.n + 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b}"}} {c}' for b, c in zip(self.buckets, self.counts)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]


class ServingEngine:
    """FIFO queue + one decode worker. `decode_s` / `decode_tokens` total the engine's own decode time, so the
    server's overhead per token can be measured against it (scripts/bench_serve.py)."""

    def __init__(self, decoder: StreamingDecoder, tokenizer, max_queue: int = 64, relay=None):
        from spd_jax.serving.relay import Relay

        self.decoder, self.tok = decoder, tokenizer
        self.relay = relay if relay is not None else Relay()
        self.queue: queue.Queue[Request | None] = queue.Queue(maxsize=max_queue)
        self.ids = itertools.count(1)
        self.lock = threading.Lock()
        self.running = 0
        self.counters = {"requests_finished": 0, "requests_cancelled": 0, "requests_failed": 0,
                         "requests_rejected": 0, "prompt_tokens": 0, "generation_tokens": 0}
        self.ttft, self.tpot = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS)
        self.decode_s, self.decode_tokens = 0.0, 0
        self.worker = threading.Thread(target=self._loop, name="spd-serve-decode", daemon=True)
        self.failure: BaseException | None = None

    def start(self) -> "ServingEngine":
        self.worker.start()
        return self

    def submit(self, req: Request) -> Request:
        req.id, req.t_submit = next(self.ids), time.perf_counter()
        try:
            self.queue.put_nowait(req)
        except queue.Full:
            with self.lock:
                self.counters["requests_rejected"] += 1
            raise QueueFull(f"the request queue is full ({self.queue.maxsize} waiting); try again later") from None
        return req

    def stop(self, timeout: float | None = None) -> None:
        """Finish the queued and running requests, then end the worker."""
        self.queue.put(None)
        self.worker.join(timeout)

    @property
    def queue_length(self) -> int:
        return self.queue.qsize()

    def _loop(self) -> None:
        from spd_jax.serving.relay import IDLE_S

        while True:
            try:
                req = self.queue.get(timeout=IDLE_S if self.relay.active else None)
            except queue.Empty:  # one process per GPU: the others wait in a broadcast; tell them nothing came
                self.relay.idle()
                continue
            if req is None:
                self.relay.stop()
                return
            with self.lock:
                self.running = 1
            try:
                self._run(req)
            except Exception as e:  # noqa: BLE001 - the request fails, the server keeps serving
                with self.lock:
                    self.counters["requests_failed"] += 1
                req.emit(("error", f"{type(e).__name__}: {e}"))
            finally:
                with self.lock:
                    self.running = 0

    def _run(self, req: Request) -> None:
        ids: list[int] = []
        sent = ""  # text already sent
        hold = max((len(s) for s in req.stop), default=1) - 1  # characters kept back while a stop string may start
        t_first = t_last = None
        finish = "length"
        with self.lock:
            self.counters["prompt_tokens"] += len(req.prompt)
        busy = 0.0  # time inside the decoder (device work and its host transfer), for the overhead measurement
        self.relay.request(req.prompt, req.sampling)
        stream = self.decoder.stream(req.prompt, req.sampling)
        while True:
            t_in = time.perf_counter()
            chunk = next(stream, None)
            now = time.perf_counter()
            busy += now - t_in
            if chunk is None:
                break
            if t_first is None:
                t_first = now
                self.ttft.observe(now - req.t_submit)
            elif chunk:
                self.tpot.observe((now - t_last) / len(chunk))
            t_last = now
            ids += chunk
            text = self.tok.decode(ids, skip_special_tokens=True)
            cut = min((i for i in (text.find(s) for s in req.stop) if i >= 0), default=-1)
            if cut >= 0:
                text, finish = text[:cut], "stop"
            elif text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
                text = sent
            elif hold:
                text = text[:max(len(sent), len(text) - hold)]
            if len(text) > len(sent):
                req.emit(("delta", text[len(sent):], len(chunk)))
                sent = text
            elif chunk:
                req.emit(("delta", "", len(chunk)))
            if finish != "stop" and req.cancelled.is_set():
                finish = "cancelled"
            if not self.relay.go_on(finish == "length"):  # every process stops after the same chunk
                break
        if finish == "length":
            if len(ids) < req.sampling.max_tokens:
                finish = "stop"  # end of sequence
            text = self.tok.decode(ids, skip_special_tokens=True)
            if len(text) > len(sent) and not text.endswith("\ufffd"):
                req.emit(("delta", text[len(sent):], 0))
        req.completion_tokens = len(ids)
        with self.lock:
            self.decode_s += busy
            self.decode_tokens += len(ids)
            self.counters["generation_tokens"] += len(ids)
            self.counters["requests_cancelled" if finish == "cancelled" else "requests_finished"] += 1
        req.emit(("done", finish))

    def metrics_text(self, model: str) -> str:
        """Prometheus text exposition (version 0.0.4)."""
        with self.lock:
            c = dict(self.counters)
            running = self.running
        lines = []
        for name, help_ in [("requests_finished", "requests answered in full"),
                            ("requests_cancelled", "requests whose client went away"),
                            ("requests_failed", "requests that failed in the engine"),
                            ("requests_rejected", "requests refused because the queue was full"),
                            ("prompt_tokens", "prompt tokens processed"),
                            ("generation_tokens", "tokens generated")]:
            lines += [f"# HELP spd_{name}_total {help_}", f"# TYPE spd_{name}_total counter",
                      f'spd_{name}_total{{model="{model}"}} {c[name]}']
        with self.lock:
            decode_s = self.decode_s
        lines += ["# HELP spd_engine_decode_seconds_total time the engine spent in prefill and decode (device work "
                  "and its host transfer): the rest of a request's time is queueing and serving overhead",
                  "# TYPE spd_engine_decode_seconds_total counter",
                  f'spd_engine_decode_seconds_total{{model="{model}"}} {decode_s:.6f}',
                  "# HELP spd_queue_length requests waiting", "# TYPE spd_queue_length gauge",
                  f'spd_queue_length{{model="{model}"}} {self.queue_length}',
                  "# HELP spd_requests_running requests being decoded", "# TYPE spd_requests_running gauge",
                  f'spd_requests_running{{model="{model}"}} {running}',
                  "# HELP spd_time_to_first_token_seconds from arrival to the first token",
                  "# TYPE spd_time_to_first_token_seconds histogram", *self.ttft.lines("spd_time_to_first_token_seconds"),
                  "# HELP spd_time_per_output_token_seconds decode time per token after the first",
                  "# TYPE spd_time_per_output_token_seconds histogram",
                  *self.tpot.lines("spd_time_per_output_token_seconds")]
        return "\n".join(lines) + "\n"
