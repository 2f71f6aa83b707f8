"""Content fingerprints of a run's inputs (model files, calibration data), recorded in its checkpoint so that a
resumed run refuses inputs that changed under it, whatever their paths are called.

* Data (`data_fingerprint`): SHA-256 of every byte of the source: a file, every file of a saved dataset folder,
  or, for the offline `wiki` corpus, the gensim file it is read from.
* Model (`model_fingerprint`): every file of a model directory (or the .gguf file) by name and size; files up to
  `FULL_HASH_BYTES` hashed whole, larger ones (weight shards of GB) sampled: their first and last MiB and
  `SAMPLES` MiB spread evenly between. An edit that changes a size, a header or a sampled MiB is seen; an edit
  of the same size confined to unsampled bytes of a large shard is not (hashing 13 GB of LLaMA-2-7B on every
  resume would cost minutes).
"""

from __future__ import annotations

import hashlib
from pathlib import Path

FULL_HASH_BYTES = 256 << 20
SAMPLES = 16
MIB = 1 << 20


def _hash_file(h, path: Path, full: bool = True) -> None:
    size = path.stat().st_size
    h.update(f"{path.name}:{size}\n".encode())
    with open(path, "rb") as f:
        if full or size <= FULL_HASH_BYTES:
            for chunk in iter(lambda: f.read(8 * MIB), b""):
                h.update(chunk)
            return
        for k in range(SAMPLES + 2):  # first MiB, SAMPLES evenly spaced, last MiB
            f.seek(min(size - MIB, k * (size - MIB) // (SAMPLES + 1)))
            h.update(f.read(MIB))


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    return [path]


def data_fingerprint(source: str) -> str:
    """SHA-256 (hex, 16 characters) of a data source's bytes ('wiki': the corpus file inside gensim)."""
    from spd_jax.data import wiki_path

    path = wiki_path() if source == "wiki" else Path(source).expanduser()
    h = hashlib.sha256()
    for f in _files(path):
        _hash_file(h, f, full=True)
    return h.hexdigest()[:16]


def model_fingerprint(path: str | Path) -> str:
    """Fingerprint (hex, 16 characters) of a model's files (large weight files sampled, see the module doc)."""
    from spd_jax.embedded import resolve_model_path

    h = hashlib.sha256()
    for f in _files(resolve_model_path(path)):
        _hash_file(h, f, full=False)
    return h.hexdigest()[:16]
