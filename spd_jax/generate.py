"""Generation: KV cache, jitted prefill and an on-device decode loop (no Python per token).

Prompts of different lengths are left-padded into one batch; pad slots are masked out of attention
and positions start at 0 at each prompt's first real token, so a padded batch gives the same tokens as
the prompts run one at a time. The prefill and decode functions donate the cache. The decode loop is a
`lax.while_loop` over fixed-length chunks of `GenerationConfig.decode_chunk` steps (inner `fori_loop`s with a known trip
count, which XLA:GPU runs without reading a predicate back to the host every token); between chunks it
stops when every sequence has emitted an end-of-sequence token or the budget is spent. Steps run after
every sequence finished (at most decode_chunk - 1) emit padding and are not counted. Decode attends over
the filled part of the cache only, in windows that double (`attention_windows`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from spd_jax.config import ConfigError, GenerationConfig
from spd_jax.distributed import to_host
from spd_jax.kernels import resolve_attention_kernel
from spd_jax.plan import DecodePath, SyncPlan
from spd_jax.runtime import Engine, Params

PAD_ID = 0


def sample_tokens(logits_bv, key, *, temperature: float, top_k: int, top_p: float):
    """Greedy (temperature == 0) or temperature / top-k / top-p sampling. Static settings."""
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits = logits_bv.astype(jnp.float32) / temperature
    if top_k > 0:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(sorted_desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass strictly above each candidate
        keep = before < top_p  # always keeps the top token
        threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # generated ids per prompt (stops before EOS)
    finished: list[bool]  # hit EOS
    prompt_lengths: list[int]
    ttft_s: float  # prefill + first token (device-synchronised)
    decode_s: float  # the on-device decode loop
    decode_tokens: int  # tokens produced by the decode loop (all sequences, excluding the first)

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_tokens / self.decode_s if self.decode_s > 0 else float("nan")


def _compile_fields(gen: GenerationConfig) -> tuple:
    """Every generation setting a compiled program depends on: all fields but the seed (an input)."""
    return dataclasses.astuple(dataclasses.replace(gen, seed=0))


KERNEL_CACHE_MULTIPLE = 128  # KV-cache slots are allocated in multiples of this with the Pallas kernel
PREFILL_BUCKET = 16  # prompts are padded to a multiple of this (one compiled prefill per padded length)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def hidden_state_bytes(tokens: int, hidden: int, dtype) -> int:
    """Bytes of `tokens` hidden states: what one block all-reduce carries for that many tokens."""
    return tokens * hidden * jnp.dtype(dtype).itemsize


def allreduce_message_bytes(hidden: int, dtype, batch: int, prompt_len: int,
                            bucket: int = PREFILL_BUCKET) -> dict[str, int]:
    """Bytes of one block all-reduce in this generation: decode sends one token's hidden state per
    sequence (batch-1's shadow row all-reduces its first row only), prefill the padded prompt's."""
    return {"decode": hidden_state_bytes(batch, hidden, dtype),
            "prefill": hidden_state_bytes(batch * _round_up(prompt_len, bucket), hidden, dtype)}


def attention_windows(t_pad: int, max_new: int, max_len: int, first: int) -> list[tuple[int, int, int]]:
    """[(first step, end step, window)] covering the decode steps 1..max_new-1.

    Step i writes cache slot t_pad + i - 1 and attends over slots < t_pad + i, so the filled part at every
    step is known when the loop is built: steps are grouped by the smallest window first * 2^k (at most
    max_len) that covers them, and each group attends over that many slots. Cost then follows the context
    (within 2x), not the allocation, with one compiled loop per window. first == 0: one window, the cache."""
    steps = max_new - 1
    if steps < 1:
        return []
    if first == 0:
        return [(1, steps + 1, max_len)]
    out, i = [], 1
    while i <= steps:
        w = first
        while w < t_pad + i:
            w *= 2
        w = min(w, max_len)
        end = min(steps, w - t_pad) + 1
        out.append((i, end, w))
        i = end
    return out


class Generator:
    """Jitted prefill + decode for one engine, parameter set and sync plan."""

    def __init__(self, engine: Engine, params: Params, plan: SyncPlan, *, bucket: int = PREFILL_BUCKET):
        self.engine = engine
        self.params = params
        self.plan = plan.check(engine.mdef.cfg.n_layers)
        self.cfg = engine.mdef.cfg
        self.bucket = bucket
        self._prefill = {}
        self._decode = {}
        self._compiled = {}  # ahead-of-time compiled (prefill, decode) per generation settings and shapes

    def _prefill_fn(self, gen: GenerationConfig):
        key = (gen.temperature, gen.top_k, gen.top_p)
        if key not in self._prefill:
            fwd = self.engine.forward(self.plan, attend_cache=False, with_cache=True)

            def prefill(params, tokens, pad, cache, rng):
                logits, cache = fwd(params, tokens, pad, cache, jnp.int32(0))
                tok = sample_tokens(logits[:, -1], rng, temperature=gen.temperature, top_k=gen.top_k,
                                    top_p=gen.top_p)
                return tok, cache

            self._prefill[key] = jax.jit(prefill, donate_argnums=(3,))
        return self._prefill[key]

    def _decode_fn(self, gen: GenerationConfig, max_new: int, t_pad: int, max_len: int):
        key = (_compile_fields(gen), max_new, t_pad, max_len)
        if key not in self._decode:
            windows = attention_windows(t_pad, max_new, max_len, gen.attend_window)
            path = self.decode_path(gen)
            fwds = {w: self.engine.forward(self.plan, attend_cache=True if w == max_len else w, with_cache=True,
                                           path=path)
                    for _, _, w in windows}
            eos = jnp.asarray(self.cfg.eos_token_ids or (-1,), jnp.int32)

            def is_eos(t):
                return jnp.any(t[:, None] == eos[None, :], axis=-1) if gen.stop_at_eos else jnp.zeros_like(t, bool)

            def decode(params, cache, first, pad, start, rng):
                b = first.shape[0]
                out = jnp.full((b, max_new), PAD_ID, jnp.int32).at[:, 0].set(first)
                done = is_eos(first)

                def make_step(fwd):
                    def step(_, c):
                        i, cache, out, done, n = c
                        prev = jax.lax.dynamic_slice_in_dim(out, i - 1, 1, axis=1)
                        logits, cache = fwd(params, prev, pad, cache, start + i - 1)
                        tok = sample_tokens(logits[:, -1], jax.random.fold_in(rng, i), temperature=gen.temperature,
                                            top_k=gen.top_k, top_p=gen.top_p)
                        tok = jnp.where(done, PAD_ID, tok)
                        n = n + jnp.sum(~done)
                        out = jax.lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
                        return i + 1, cache, out, done | is_eos(tok), n

                    return step

                def run(c, lo: int, hi: int, fwd):
                    """Steps lo..hi-1 in fixed-length chunks (a loop with a known trip count needs no per-step
                    host round trip on GPU); the stop condition (every sequence at EOS) between chunks."""
                    ch = max(1, min(gen.decode_chunk, hi - lo))
                    n_full, rest = divmod(hi - lo, ch)
                    step = make_step(fwd)
                    if n_full:
                        c = jax.lax.while_loop(lambda c: (c[0] < lo + n_full * ch) & ~jnp.all(c[3]),
                                               lambda c: jax.lax.fori_loop(0, ch, step, c), c)
                    if rest:
                        c = jax.lax.cond(jnp.all(c[3]), lambda c: c, lambda c: jax.lax.fori_loop(0, rest, step, c), c)
                    return c

                c = (jnp.int32(1), cache, out, done, jnp.int32(0))
                for lo, hi, w in windows:  # each window's steps attend over the first w cache slots
                    c = run(c, lo, hi, fwds[w])
                _, cache, out, done, n = c
                return out, done, n, cache

            self._decode[key] = jax.jit(decode, donate_argnums=(1,))
        return self._decode[key]

    def generate(self, prompts: Sequence[Sequence[int]], gen: GenerationConfig) -> GenerationResult:
        gen.validate()
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ConfigError("every prompt must have at least one token")
        lengths = [len(p) for p in prompts]
        longest = max(lengths)
        self.cfg.check_fits(longest + gen.max_new_tokens,
                            f"prompt of {longest} tokens + {gen.max_new_tokens} new tokens: a sequence",
                            "shorten the prompt or lower --max-new-tokens")
        t_pad, max_len = self._padded_lengths(longest, gen)
        b = len(prompts)
        tokens = np.full((b, t_pad), PAD_ID, np.int32)
        pad = np.zeros((b,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, t_pad - len(p):] = p
            pad[i] = t_pad - len(p)
        eng = self.engine
        cache = eng.init_cache(b, max_len)
        rng = jax.random.PRNGKey(gen.seed)
        r_first, r_loop = jax.random.split(rng)
        tokens_d, pad_d = eng.replicate(tokens), eng.replicate(pad)

        prefill, decode = self._compiled.get(self._compiled_key(gen, b, t_pad, max_len)) or (
            self._prefill_fn(gen), self._decode_fn(gen, gen.max_new_tokens, t_pad, max_len))

        t0 = time.perf_counter()
        first, cache = prefill(self.params, tokens_d, pad_d, cache, r_first)
        first.block_until_ready()
        ttft = time.perf_counter() - t0

        t1 = time.perf_counter()
        out, done, n, cache = decode(self.params, cache, first, pad_d, jnp.int32(t_pad), r_loop)
        out = to_host(out)
        decode_s = time.perf_counter() - t1
        done = to_host(done)

        eos = set(self.cfg.eos_token_ids) if gen.stop_at_eos else set()
        seqs = []
        for row in out:
            seq = []
            for t in row.tolist():
                if t in eos:
                    break
                seq.append(t)
            seqs.append(seq)
        return GenerationResult(seqs, done.tolist(), lengths, ttft, decode_s, int(to_host(n)))

    def attention_kernel(self, gen: GenerationConfig) -> str:
        """The decode attention this generation runs: `gen.attention_kernel` with "auto" resolved for this
        device and model (`kernels.resolve_attention_kernel`)."""
        return resolve_attention_kernel(gen.attention_kernel, self.cfg.head_dim)

    def decode_path(self, gen: GenerationConfig) -> DecodePath:
        """How this generation's decode steps execute (built once from the config; see `plan.DecodePath`)."""
        return DecodePath.of(gen, self.attention_kernel(gen))

    def _padded_lengths(self, longest_prompt: int, gen: GenerationConfig) -> tuple[int, int]:
        """(prompt length padded to the bucket, KV-cache length): the shape class compiled for. With the
        Pallas decode-attention kernel the cache is a multiple of 128 slots (at most 112 more), so that
        the kernel always loops over 128-slot blocks (`kernels.split_plan`)."""
        t_pad = _round_up(longest_prompt, self.bucket)
        slots = KERNEL_CACHE_MULTIPLE if self.attention_kernel(gen) == "pallas" else self.bucket
        return t_pad, _round_up(t_pad + gen.max_new_tokens, slots)

    @staticmethod
    def _compiled_key(gen: GenerationConfig, batch: int, t_pad: int, max_len: int):
        return (_compile_fields(gen), batch, t_pad, max_len)

    def precompile(self, gen: GenerationConfig, prompt_len: int, batch: int = 1) -> None:
        """Compile prefill and decode ahead of time for prompts of up to `prompt_len` tokens (the same
        bucket) without running them. Safe to call from several threads at once for different
        generators (XLA compiles in parallel; nothing executes), which is how the benchmark compiles
        its SPD configurations. Inputs are abstract (no `device_put`): in a multi-process run a real
        placement checks equality across processes, a collective that threads must not interleave."""
        gen.validate()
        t_pad, max_len = self._padded_lengths(prompt_len, gen)
        key = self._compiled_key(gen, batch, t_pad, max_len)
        if key in self._compiled:
            return
        eng = self.engine

        def placed(tree, shardings):  # abstract arrays with these shardings
            return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)

        cache = jax.eval_shape(lambda: eng.init_cache(batch, max_len))
        if not eng.emulate:
            cache = placed(cache, eng.cache_shardings())
        tokens = eng.replicated_spec((batch, t_pad), jnp.int32)
        pad = eng.replicated_spec((batch,), jnp.int32)
        rng = jax.random.PRNGKey(0)
        prefill = self._prefill_fn(gen).lower(self.params, tokens, pad, cache, rng).compile()
        first_sh, cache_sh = prefill.output_shardings
        first = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=first_sh)
        cache = placed(cache, cache_sh)
        decode = self._decode_fn(gen, gen.max_new_tokens, t_pad, max_len).lower(self.params, cache, first, pad, jnp.int32(t_pad),
                                                                 rng).compile()
        self._compiled[key] = (prefill, decode)
