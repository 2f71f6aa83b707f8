"""Decode one request in chunks, so a server can stream tokens and stop early.

`StreamingDecoder` runs the same programs as `generate.Generator` (the same forward, cache length, attention
windows, prompt bucket and random keys), cut into chunks of `chunk` decode steps that each return to the host:
greedy output is token for token what `spd-infer` prints for the same prompt and plan. Sampling parameters
(temperature, top-p) are traced values, not compile-time constants, so requests with any of them share one
set of compiled programs; compiled programs are cached per (prompt bucket, cache length, window, steps).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from spd_jax.config import GenerationConfig
from spd_jax.distributed import to_host
from spd_jax.generate import PAD_ID, Generator, attention_windows


def sample_dynamic(logits_bv, key, temperature, top_p):
    """Greedy where temperature == 0, else temperature + nucleus (top-p) sampling; both settings are traced
    scalars. The greedy branch is `argmax`, as `generate.sample_tokens` computes it."""
    greedy = jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / jnp.maximum(temperature, 1e-6)
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    keep = (jnp.cumsum(probs, axis=-1) - probs) < top_p  # always keeps the top token
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    sampled = jax.random.categorical(key, jnp.where(logits < threshold, -jnp.inf, logits), axis=-1)
    return jnp.where(temperature == 0, greedy, sampled.astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


class StreamingDecoder:
    """Prefill + chunked decode of one sequence (batch 1) for an engine, parameters and sync plan."""

    def __init__(self, generator: Generator, gen: GenerationConfig, chunk: int = 8):
        self.g = generator
        self.gen = dataclasses.replace(gen, temperature=0.0, top_k=0, top_p=1.0)  # sampling is per request
        self.chunk = max(1, chunk)
        self._prefill = {}
        self._steps = {}
        self.eos = set(generator.cfg.eos_token_ids)

    @property
    def cfg(self):
        return self.g.cfg

    def lengths(self, prompt_len: int, max_tokens: int) -> tuple[int, int]:
        """(prompt bucket, cache length): what `Generator.generate` allocates for this request."""
        return self.g._padded_lengths(prompt_len, dataclasses.replace(self.gen, max_new_tokens=max_tokens))

    def _prefill_fn(self):
        key = "prefill"
        if key not in self._prefill:
            fwd = self.g.engine.forward(self.g.plan, attend_cache=False, with_cache=True)

            def prefill(params, tokens, pad, cache, rng, temperature, top_p):
                logits, cache = fwd(params, tokens, pad, cache, jnp.int32(0))
                return sample_dynamic(logits[:, -1], rng, temperature, top_p), cache

            self._prefill[key] = jax.jit(prefill, donate_argnums=(3,))
        return self._prefill[key]

    def _steps_fn(self, window: int, n: int, max_len: int):
        """n decode steps attending over the first `window` cache slots (Generator's loop body, unrolled into
        a fori_loop of known length)."""
        key = (window, n, max_len)
        if key not in self._steps:
            fwd = self.g.engine.forward(self.g.plan, attend_cache=True if window == max_len else window,
                                        with_cache=True, path=self.g.decode_path(self.gen))

            def steps(params, cache, prev, pad, index, rng, first_step, temperature, top_p):
                def step(j, c):
                    cache, tok, out = c
                    logits, cache = fwd(params, tok[:, None], pad, cache, index + j)
                    nxt = sample_dynamic(logits[:, -1], jax.random.fold_in(rng, first_step + j), temperature, top_p)
                    return cache, nxt, out.at[:, j].set(nxt)

                out = jnp.full((prev.shape[0], n), PAD_ID, jnp.int32)
                cache, _, out = jax.lax.fori_loop(0, n, step, (cache, prev, out))
                return out, cache

            self._steps[key] = jax.jit(steps, donate_argnums=(1,))
        return self._steps[key]

    def plan_steps(self, prompt_len: int, max_tokens: int) -> list[tuple[int, int, int]]:
        """[(first step, steps, window)]: decode steps 1..max_tokens-1 in chunks that never cross one of
        Generator's window boundaries (each step attends over exactly the slots it would in `generate`)."""
        t_pad, max_len = self.lengths(prompt_len, max_tokens)
        out = []
        for lo, hi, w in attention_windows(t_pad, max_tokens, max_len, self.gen.attend_window):
            for a in range(lo, hi, self.chunk):
                out.append((a, min(self.chunk, hi - a), w))
        return out

    def stream(self, prompt: list[int], sampling: Sampling) -> Iterator[list[int]]:
        """Token ids in chunks (the first chunk holds the prefill's token); stops after an end-of-sequence token
        (not yielded) or max_tokens. The caller may stop iterating at any chunk."""
        g, eng = self.g, self.g.engine
        t_pad, max_len = self.lengths(len(prompt), sampling.max_tokens)
        tokens = np.full((1, t_pad), PAD_ID, np.int32)
        tokens[0, t_pad - len(prompt):] = prompt
        pad = np.asarray([t_pad - len(prompt)], np.int32)
        rng = jax.random.PRNGKey(sampling.seed)
        r_first, r_loop = jax.random.split(rng)
        temp, top_p = jnp.float32(sampling.temperature), jnp.float32(sampling.top_p)
        pad_d = eng.replicate(pad)
        cache = eng.init_cache(1, max_len)
        first, cache = self._prefill_fn()(g.params, eng.replicate(tokens), pad_d, cache, r_first, temp, top_p)
        prev = first
        tok = int(to_host(first)[0])
        if tok in self.eos:
            return
        yield [tok]
        for first_step, n, window in self.plan_steps(len(prompt), sampling.max_tokens):
            out, cache = self._steps_fn(window, n, max_len)(g.params, cache, prev, pad_d,
                                                            jnp.int32(t_pad + first_step - 1), r_loop,
                                                            jnp.int32(first_step), temp, top_p)
            prev = out[:, -1]
            ids = to_host(out)[0].tolist()
            cut = next((k for k, t in enumerate(ids) if t in self.eos), None)
            if cut is not None:
                if cut:
                    yield ids[:cut]
                return
            yield ids
