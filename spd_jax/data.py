"""Calibration and evaluation text: sources, a train/eval split that never overlaps, token sequences.

Sources (`--data`):
  * `wiki` (default, offline): the English Wikipedia articles shipped inside the `gensim` wheel
    (gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2),
    cleaned with gensim's own wiki markup filter. The stand-in for WikiText-2, which is not obtainable
    offline.
  * a local `.txt` file (documents separated by blank lines) or `.jsonl` file (one {"text": ...} per line);
  * a Hugging Face `datasets` directory saved with `save_to_disk` (e.g. wikitext-2; needs `datasets`).

Split: documents are assigned to `eval` when (index % 10 == 0) and to `train` otherwise, so the
calibration (train) and evaluation streams never share a document.
"""

from __future__ import annotations

import bz2
import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Iterable, Literal

import numpy as np

from spd_jax.config import ConfigError

WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
EVAL_EVERY = 10


def wiki_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise ConfigError("the offline 'wiki' corpus needs gensim: pip install gensim")
    return Path(list(spec.submodule_search_locations)[0]) / WIKI_FILE


def _clean(text: str) -> str:
    text = re.sub(r"'{2,}", "", text)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip()


def wiki_documents(min_chars: int = 500) -> list[str]:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki

    docs = []
    with bz2.open(wiki_path(), "rb") as f:
        for _title, text, _pid in extract_pages(f, filter_namespaces=("0",)):
            t = _clean(filter_wiki(text))
            if len(t) >= min_chars:
                docs.append(t)
    return docs


def file_documents(path: Path) -> list[str]:
    if not path.exists():
        raise ConfigError(f"data file not found: {path}")
    if path.is_dir():
        try:
            import datasets  # noqa: F401
        except ImportError:
            raise ConfigError(f"{path} is a directory: reading a saved HF dataset needs `pip install datasets`") from None
        from datasets import load_from_disk

        ds = load_from_disk(str(path))
        if hasattr(ds, "keys"):  # DatasetDict: use every split, our own split decides train/eval
            rows = [r for split in ds.keys() for r in ds[split]["text"]]
        else:
            rows = list(ds["text"])
        # wikitext has one line per row; group consecutive lines into documents at headings
        docs, cur = [], []
        for line in rows:
            if re.match(r"^ = [^=]", line) and cur:
                docs.append("".join(cur).strip())
                cur = []
            cur.append(line)
        if cur:
            docs.append("".join(cur).strip())
        return [d for d in docs if d]
    if path.suffix == ".jsonl":
        docs = []
        with open(path) as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        docs.append(json.loads(line)["text"])
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise ConfigError(f"{path}:{n}: expected a JSON object with a 'text' field") from None
        return docs
    text = path.read_text(errors="replace")
    return [d.strip() for d in re.split(r"\n\s*\n", text) if d.strip()]


def documents(source: str) -> list[str]:
    docs = wiki_documents() if source == "wiki" else file_documents(Path(source).expanduser())
    if len(docs) < 2:
        raise ConfigError(f"data source {source!r} has {len(docs)} document(s); need at least 2 for a train/eval split")
    return docs


def split_documents(docs: list[str], split: Literal["train", "eval"]) -> list[str]:
    # With few documents, make sure both splits are non-empty.
    every = EVAL_EVERY if len(docs) >= 2 * EVAL_EVERY else 2
    return [d for i, d in enumerate(docs) if (i % every == 0) == (split == "eval")]


def token_stream(tokenizer, docs: Iterable[str], eos_id: int | None) -> np.ndarray:
    ids: list[int] = []
    for d in docs:
        ids.extend(tokenizer(d, add_special_tokens=False)["input_ids"])
        if eos_id is not None:
            ids.append(eos_id)
    return np.asarray(ids, np.int32)


@dataclasses.dataclass(frozen=True)
class DataSpec:
    source: str = "wiki"
    n_samples: int = 16
    seq_len: int = 256
    seed: int = 0


def sample_sequences(stream: np.ndarray, n: int, length: int, seed: int) -> np.ndarray:
    """n random windows of `length` tokens from a token stream (the paper's random calibration crops)."""
    if len(stream) < length + 1:
        raise ConfigError(f"the data has {len(stream)} tokens, fewer than one sequence of {length}")
    starts = np.random.RandomState(seed).randint(0, len(stream) - length, size=n)
    return np.stack([stream[s:s + length] for s in starts]).astype(np.int32)


def contiguous_sequences(stream: np.ndarray, length: int, max_tokens: int | None = None) -> np.ndarray:
    """Non-overlapping windows (for perplexity evaluation)."""
    if max_tokens is not None:
        stream = stream[: max_tokens]
    n = len(stream) // length
    if n == 0:
        raise ConfigError(f"the data has {len(stream)} tokens, fewer than one sequence of {length}")
    return stream[: n * length].reshape(n, length).astype(np.int32)


def calibration_tokens(spec: DataSpec, tokenizer, eos_id: int | None) -> np.ndarray:
    docs = split_documents(documents(spec.source), "train")
    return sample_sequences(token_stream(tokenizer, docs, eos_id), spec.n_samples, spec.seq_len, spec.seed)


def eval_stream(source: str, tokenizer, eos_id: int | None, split: Literal["eval", "all"] = "eval") -> np.ndarray:
    """Tokens of `source` for perplexity: the held-out split (documents never used for calibration), or
    every document (`all`, for a file given only for evaluation)."""
    if split not in ("eval", "all"):
        raise ConfigError(f"split must be 'eval' or 'all', got {split!r}")
    if split == "all":
        docs = wiki_documents() if source == "wiki" else file_documents(Path(source).expanduser())
        if not docs:
            raise ConfigError(f"data source {source!r} has no text")
        return token_stream(tokenizer, docs, eos_id)
    return token_stream(tokenizer, split_documents(documents(source), "eval"), eos_id)


def text_tokens(source: str, tokenizer, split: Literal["eval", "all"] = "all") -> np.ndarray:
    """A text as ONE token stream, as perplexity is computed elsewhere (the transformers perplexity guide,
    lm-eval's rolling log-likelihood): the documents joined by a blank line and tokenized as one string, with the
    tokenizer's own special tokens at its start only: no end-of-sequence token between paragraphs, no reset at
    blank lines. A .txt file is read whole; a .jsonl file's texts and the `wiki` corpus's documents are joined.
    `split`: "eval" keeps the held-out documents of the calibration split rule only."""
    if split not in ("eval", "all"):
        raise ConfigError(f"split must be 'eval' or 'all', got {split!r}")
    path = None if source == "wiki" else Path(source).expanduser()
    if split == "all" and path is not None and path.suffix not in (".jsonl",) and path.is_file():
        text = path.read_text(errors="replace")  # whole, paragraphs and all
    else:
        docs = documents(source) if split == "eval" else (wiki_documents() if path is None else file_documents(path))
        if split == "eval":
            docs = split_documents(docs, "eval")
        text = "\n\n".join(docs)
    if not text.strip():
        raise ConfigError(f"data source {source!r} has no text")
    return np.asarray(tokenizer(text, add_special_tokens=True)["input_ids"], np.int32)


def sliding_windows(n_tokens: int, window: int, stride: int | None = None) -> list[tuple[int, int, int]]:
    """[(begin, end, first scored)] windows over a stream of n_tokens, the transformers perplexity guide's loop:
    windows of `window` tokens starting every `stride` tokens (default: `window`, non-overlapping); each window
    scores the targets in [first scored, end) that no earlier window scored, each predicted from the window's
    tokens before it. Every target is scored once; with stride < window each has at least window - stride tokens
    of context, and with stride == window the first token of each window is not scored (it has none)."""
    stride = window if stride is None else stride
    if window < 2:
        raise ConfigError(f"a perplexity window needs at least 2 tokens, got {window}")
    if not 1 <= stride <= window:
        raise ConfigError(f"the perplexity stride must be in 1..window ({window}), got {stride}")
    if n_tokens < 2:
        raise ConfigError(f"the text has {n_tokens} token(s): nothing to score")
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + window, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def cache_dir() -> Path:
    return Path(os.environ.get("SPD_JAX_CACHE", Path.home() / ".cache" / "spd-jax"))
