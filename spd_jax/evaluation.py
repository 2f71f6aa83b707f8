"""Evaluation: perplexity on held-out text and zero-shot multiple-choice accuracy by log-likelihood.

Scoring follows lm-evaluation-harness: for each choice, the log-likelihood of the continuation tokens
given the context; `acc` picks the highest log-likelihood, `acc_norm` the highest log-likelihood divided
by the continuation's length in characters. Token log-likelihoods come from the vocab-parallel NLL
computed inside each TP shard (full-vocabulary logits are never gathered).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P
from tqdm.auto import tqdm

from spd_jax.distributed import to_host
from spd_jax.model import (
    psum,
    vocab_parallel_argmax,
    vocab_parallel_is_argmax,
    vocab_parallel_log_softmax,
    vocab_parallel_nll,
)
from spd_jax.plan import SyncPlan
from spd_jax.runtime import Engine, Params


@dataclasses.dataclass
class MCItem:
    context: str
    choices: list[str]
    gold: int  # index of the correct choice


@dataclasses.dataclass
class TaskResult:
    name: str
    n: int
    acc: float
    acc_norm: float

    @property
    def acc_stderr(self) -> float:
        return accuracy_stderr(self.acc, self.n)

    @property
    def acc_norm_stderr(self) -> float:
        return accuracy_stderr(self.acc_norm, self.n)


def accuracy_stderr(acc: float, n: int) -> float:
    """Standard error of an accuracy over n items, as lm-evaluation-harness reports `acc_stderr`: the sample
    standard deviation of the 0/1 scores over sqrt(n), i.e. sqrt(acc (1 - acc) / (n - 1))."""
    if n < 2:
        return float("nan")
    return math.sqrt(max(acc * (1 - acc), 0.0) / (n - 1))


class Scorer:
    """Token log-likelihoods for any engine/params/sync plan, batched and jitted per (plan, shape)."""

    def __init__(self, engine: Engine, params: Params, plan: SyncPlan, batch_size: int = 16,
                 bucket: int = 32):
        self.engine, self.params = engine, params
        self.plan = plan.check(engine.mdef.cfg.n_layers)
        self.batch_size, self.bucket = batch_size, bucket
        self._fn = None

    def _nll_fn(self):
        if self._fn is None:
            graphdef, plan = self.engine.mdef.graphdef, self.plan
            vocab = self.engine.mdef.cfg.vocab_size

            def shard(params, tokens, pad):
                model = nnx.merge(graphdef, params)
                logits, _ = model(tokens, pad, None, 0, plan=plan)
                lg, tg = logits[:, :-1], tokens[:, 1:]
                return vocab_parallel_nll(lg, tg, vocab), vocab_parallel_is_argmax(lg, tg, vocab)

            f = self.engine.sharded(shard, (self.engine.mdef.specs(), P(), P()), (P(), P()),
                                    check_vma=plan.allreduce.checkable)
            self._fn = jax.jit(f)
        return self._fn

    def padded_length(self, t: int) -> int:
        """The compiled length for sequences of t tokens: `bucket` times a power of two, so that a task's
        lengths share a handful of compiled programs (one per bucket) instead of one per multiple of `bucket`."""
        n = self.bucket
        while n < t:
            n *= 2
        return n

    def token_nll(self, seqs: Sequence[Sequence[int]]) -> list[np.ndarray]:
        """Per sequence, the NLL of tokens 1..n-1 (array of length n-1)."""
        return self.token_scores(seqs)[0]

    def token_scores(self, seqs: Sequence[Sequence[int]]) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """Per sequence, (NLL of tokens 1..n-1, whether each of them is the greedy prediction)."""
        out: list[np.ndarray] = [None] * len(seqs)  # type: ignore[list-item]
        greedy: list[np.ndarray] = [None] * len(seqs)  # type: ignore[list-item]
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        f = self._nll_fn()
        rep = self.engine.replicate
        cfg = self.engine.mdef.cfg
        if order:
            cfg.check_fits(len(seqs[order[-1]]), "a scored sequence", "use a shorter window (--ppl-len)")
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            t = max(len(seqs[i]) for i in idx)
            t = max(t, min(self.padded_length(t), cfg.max_position))  # the bucket, within the context
            b = self.batch_size
            tokens = np.zeros((b, t), np.int32)  # right padding: causal attention never sees it
            for r, i in enumerate(idx):
                tokens[r, : len(seqs[i])] = seqs[i]
            nll, top = (to_host(a) for a in f(self.params, rep(tokens), rep(np.zeros((b,), np.int32))))
            for r, i in enumerate(idx):
                out[i] = nll[r, : len(seqs[i]) - 1]
                greedy[i] = top[r, : len(seqs[i]) - 1]
        return out, greedy


def perplexity(scorer: Scorer, windows_nt: np.ndarray) -> float:
    """exp(mean NLL) over every predicted token of the (non-overlapping) windows."""
    nll = scorer.token_nll([list(w) for w in windows_nt])
    return float(math.exp(np.concatenate(nll).mean()))


@dataclasses.dataclass
class StreamPerplexity:
    """Perplexity of one token stream (`stream_perplexity`): exp(nll / tokens) over `tokens` scored targets."""

    value: float
    nll: float  # summed over the scored tokens, nats
    tokens: int  # targets scored
    stream_tokens: int
    window: int
    stride: int
    windows: int


def stream_perplexity(scorer: Scorer, stream: np.ndarray, window: int, stride: int | None = None,
                      max_tokens: int | None = None) -> StreamPerplexity:
    """The standard perplexity of a token stream: sliding windows (`data.sliding_windows`), every target scored
    once from the context its window gives it, exp(total NLL / targets scored): the transformers perplexity
    guide's number for the same tokens, window and stride. `max_tokens`: score the stream's first tokens only."""
    from spd_jax.data import sliding_windows

    stream = np.asarray(stream, np.int32)[: max_tokens or None]
    stride = window if stride is None else stride
    spans = sliding_windows(len(stream), window, stride)
    nll = scorer.token_nll([stream[b:e].tolist() for b, e, _ in spans])
    total = sum(float(np.sum(x[s - b - 1:], dtype=np.float64)) for x, (b, e, s) in zip(nll, spans))
    n = sum(e - s for _, e, s in spans)
    return StreamPerplexity(float(math.exp(total / n)), total, n, len(stream), window, stride, len(spans))


def divergence_from_reference(engine: Engine, ref_params: Params, params: Params, plan: SyncPlan,
                              windows_nt: np.ndarray, batch_size: int = 8) -> dict:
    """How far a (SPD, distilled) model's next-token distribution is from the unmodified model's, on text.

    Reference: `ref_params` with every sync point kept. Per predicted position: the KL divergence
    KL(p_ref || p_model) in nats and whether both models' greedy (top-1) tokens agree. Returns the means
    over every position of every window. Unlike perplexity or a multiple-choice accuracy near chance, this
    shows small changes on small models. Computed inside the TP shards (vocab-parallel); the
    full-vocabulary distributions are never gathered."""
    graphdef = engine.mdef.graphdef
    plan, sync = plan.check(engine.mdef.cfg.n_layers), SyncPlan.sync(engine.mdef.cfg.n_layers)
    vocab = engine.mdef.cfg.vocab_size

    def shard(ref_p, p, tokens, pad):
        lg_ref, _ = nnx.merge(graphdef, ref_p)(tokens, pad, None, 0, plan=sync)
        lg, _ = nnx.merge(graphdef, p)(tokens, pad, None, 0, plan=plan)
        lp_ref, lp = vocab_parallel_log_softmax(lg_ref, vocab), vocab_parallel_log_softmax(lg, vocab)
        terms = jnp.where(jnp.isfinite(lp_ref), jnp.exp(lp_ref) * (lp_ref - lp), 0.0)
        kl = psum(jnp.sum(terms, axis=-1))
        agree = vocab_parallel_argmax(lg_ref, vocab) == vocab_parallel_argmax(lg, vocab)
        return kl, agree

    specs = engine.mdef.specs()
    f = jax.jit(engine.sharded(shard, (specs, specs, P(), P()), (P(), P()), check_vma=plan.allreduce.checkable))
    kls, agrees = [], []
    rep = engine.replicate
    for s in range(0, len(windows_nt), batch_size):
        w = np.asarray(windows_nt[s:s + batch_size], np.int32)
        n = len(w)
        if n < batch_size:  # one compiled shape: pad the last batch with copies, then drop them
            w = np.concatenate([w, np.repeat(w[:1], batch_size - n, axis=0)])
        kl, agree = (to_host(a) for a in f(ref_params, params, rep(w), rep(np.zeros((batch_size,), np.int32))))
        kls.append(kl[:n])
        agrees.append(agree[:n])
    kl, agree = np.concatenate(kls), np.concatenate(agrees)
    return {"kl_mean": float(kl.mean()), "top1_agreement": float(agree.mean()), "positions": int(kl.size)}


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Context and continuation ids, split as lm-evaluation-harness does (whitespace stays with the
    continuation; encode the whole string and split at the context's length when that is consistent)."""
    n_space = len(context) - len(context.rstrip())
    if n_space:
        continuation = context[-n_space:] + continuation
        context = context[:-n_space]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    if whole[: len(ctx)] == ctx and len(whole) > len(ctx):
        return ctx, whole[len(ctx):]
    return ctx, tokenizer(continuation, add_special_tokens=False)["input_ids"]


def choice_loglikelihoods(scorer: Scorer, tokenizer, items: Sequence[MCItem], max_len: int | None = None,
                          progress: bool = False, desc: str = "") -> list[list[float]]:
    seqs, spans = [], []
    bos = getattr(tokenizer, "bos_token_id", None)
    for it in items:
        for ch in it.choices:
            ctx, cont = encode_pair(tokenizer, it.context, ch)
            if not ctx:
                ctx = [bos if bos is not None else 0]
            seq = ctx + cont
            if max_len is not None and len(seq) > max_len:  # keep the end: the continuation must fit
                cut = len(seq) - max_len
                seq = seq[cut:]
                ctx = ctx[cut:]
            seqs.append(seq)
            spans.append((len(ctx), len(seq)))
    nll = []
    step = max(1, scorer.batch_size * 8)
    for s in tqdm(range(0, len(seqs), step), desc=desc, disable=not progress, unit="chunk"):
        nll.extend(scorer.token_nll(seqs[s:s + step]))
    lls, k = [], 0
    for it in items:
        row = []
        for _ in it.choices:
            a, b = spans[k]
            row.append(-float(nll[k][a - 1:b - 1].sum()))  # token j is predicted at position j-1
            k += 1
        lls.append(row)
    return lls


def accuracy(items: Sequence[MCItem], lls: Sequence[Sequence[float]]) -> tuple[float, float]:
    acc = np.mean([int(np.argmax(ll) == it.gold) for it, ll in zip(items, lls)])
    acc_norm = np.mean([int(np.argmax(np.asarray(ll) / np.array([max(len(c), 1) for c in it.choices])) == it.gold)
                        for it, ll in zip(items, lls)])
    return float(acc), float(acc_norm)


def evaluate_task(scorer: Scorer, tokenizer, name: str, items: Sequence[MCItem], max_len: int | None = None,
                  progress: bool = False) -> TaskResult:
    lls = choice_loglikelihoods(scorer, tokenizer, items, max_len, progress, desc=name)
    acc, acc_norm = accuracy(items, lls)
    return TaskResult(name, len(items), acc, acc_norm)


def mean_accuracy(results: Iterable[TaskResult]) -> float:
    r = list(results)
    return float(np.mean([x.acc for x in r])) if r else float("nan")


def mean_accuracy_stderr(results: Iterable[TaskResult]) -> float:
    """Standard error of the unweighted mean of k task accuracies (independent tasks): sqrt(sum se_i^2) / k."""
    r = list(results)
    return float(math.sqrt(sum(x.acc_stderr ** 2 for x in r)) / len(r)) if r else float("nan")


def evaluate_loaded(scorer: Scorer, tokenizer, name: str, fmt: str, items: list, max_len: int | None = None,
                    progress: bool = False) -> TaskResult:
    """Score a task loaded by `spd_jax.tasks.load_task` (multiple choice, WinoGrande or LAMBADA)."""
    if fmt == "winogrande":  # partial scoring: the same continuation after each option-filled prefix
        flat = [it for pair, _ in items for it in pair]
        lls = choice_loglikelihoods(scorer, tokenizer, flat, max_len, progress, desc=name)
        correct = [int(np.argmax([lls[2 * k][0], lls[2 * k + 1][0]]) == gold) for k, (_, gold) in enumerate(items)]
        acc = float(np.mean(correct))
        return TaskResult(name, len(items), acc, acc)
    if fmt == "lambada":  # accuracy: every token of the last word is the greedy prediction
        seqs, spans = [], []
        for it in items:
            ctx, cont = encode_pair(tokenizer, it.context, it.choices[0])
            seqs.append(ctx + cont)
            spans.append((len(ctx), len(ctx) + len(cont)))
        _, greedy = scorer.token_scores(seqs)
        acc = float(np.mean([bool(g[a - 1:b - 1].all()) for g, (a, b) in zip(greedy, spans)]))
        return TaskResult(name, len(items), acc, acc)
    return evaluate_task(scorer, tokenizer, name, items, max_len, progress)
