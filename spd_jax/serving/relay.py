"""One process per GPU: process 0 serves HTTP and tells the other processes what to decode.

Every process holds its shards of the model and must run the same programs in the same order (their
collectives meet). Process 0's engine broadcasts each request before decoding it (`multihost_utils.
broadcast_one_to_all`, through `jax.distributed`) and, after every decode chunk, whether to go on (its client
may have gone, or a stop string appeared); the others (`follow`) receive and decode in lockstep. While the
queue is empty, process 0 broadcasts an idle message every `IDLE_S` seconds so no process waits in a
collective indefinitely. With one process every call here is a no-op.
"""

from __future__ import annotations

import numpy as np

from spd_jax.serving.decoder import Sampling, StreamingDecoder

IDLE, REQUEST, STOP = 0, 1, 2
IDLE_S = 0.5
HEADER = 8
PROMPT_BUCKET = 64  # prompts travel padded to 64 * 2^k tokens: a few broadcast shapes, compiled once each


def _bcast(x: np.ndarray) -> np.ndarray:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.broadcast_one_to_all(x))


def _f32_bits(x: float) -> int:
    return int(np.float32(x).view(np.int32))


def _bits_f32(b: int) -> float:
    return float(np.int32(b).view(np.float32))


class Relay:
    def __init__(self):
        import jax

        self.active = jax.process_count() > 1
        self.source = jax.process_index() == 0

    # ---- process 0
    def request(self, prompt: list[int], s: Sampling) -> None:
        if not self.active:
            return
        n = len(prompt)
        size = PROMPT_BUCKET
        while size < n:
            size *= 2
        _bcast(np.asarray([REQUEST, n, size, s.max_tokens, s.seed, _f32_bits(s.temperature), _f32_bits(s.top_p), 0],
                          np.int32))
        padded = np.zeros(size, np.int32)
        padded[:n] = prompt
        _bcast(padded)

    def idle(self) -> None:
        if self.active:
            _bcast(np.asarray([IDLE] + [0] * (HEADER - 1), np.int32))

    def stop(self) -> None:
        if self.active:
            _bcast(np.asarray([STOP] + [0] * (HEADER - 1), np.int32))

    def go_on(self, go: bool) -> bool:
        """After each decode chunk: process 0 says whether the request goes on; every process gets its word."""
        if not self.active:
            return go
        return bool(_bcast(np.asarray([int(go)], np.int32))[0])

    # ---- the other processes
    def receive(self) -> tuple[int, list[int] | None, Sampling | None]:
        h = _bcast(np.zeros(HEADER, np.int32))
        op = int(h[0])
        if op != REQUEST:
            return op, None, None
        n, size = int(h[1]), int(h[2])
        prompt = _bcast(np.zeros(size, np.int32))[:n].tolist()
        return op, prompt, Sampling(int(h[3]), _bits_f32(h[5]), _bits_f32(h[6]), int(h[4]))


def follow(decoder: StreamingDecoder, relay: Relay) -> None:
    """The loop of a process other than 0: decode what process 0 decodes, until it says stop."""
    while True:
        op, prompt, sampling = relay.receive()
        if op == STOP:
            return
        if op != REQUEST:
            continue
        for _ in decoder.stream(prompt, sampling):
            if not relay.go_on(False):
                break
