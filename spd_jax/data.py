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


def cache_dir() -> Path:
    return Path(os.environ.get("SPD_JAX_CACHE", Path.home() / ".cache" / "spd-jax"))
