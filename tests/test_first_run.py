"""What a new user meets first: the main job without torch, a demo where SPD keeps the answer, quiet
loading, evaluation of the user's own files."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")

# Runs a launch script with torch made unimportable (as in an environment without it): `sys.modules`
# holds None for it, so `import torch` fails and importlib's find_spec reports it absent.
NO_TORCH = """
import runpy, sys
sys.modules['torch'] = None
script, *args = sys.argv[1:]
sys.argv = [script, *args]
try:
    runpy.run_path(script, run_name='__main__')
finally:
    print('TORCH_LOADED=' + str(sys.modules.get('torch') is not None), file=sys.stderr)
"""


def test_main_job_runs_without_torch_and_spd_keeps_the_answer():
    """The README's main job (embedded model, TP 3, SPD on the shipped half plan vs sync), torch-free."""
    r = subprocess.run([sys.executable, "-c", NO_TORCH, str(ROOT / "launch/infer.py"), "--config",
                        str(ROOT / "configs/smollm2_tp3_spd_half.yaml"), "--compare-sync", "--max-new-tokens", "4",
                        "--no-warmup", "--json", "--prompt", "The capital of France is"],
                       capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "TORCH_LOADED=False" in r.stderr
    out = json.loads(r.stdout)
    assert len(out["spd_blocks"]) == 15 and out["n_layers"] == 30
    assert out["block_allreduces_per_token"] == 45 and out["sync"]["block_allreduces_per_token"] == 60
    spd_text, sync_text = out["results"][0]["text"], out["sync"]["texts"][0]
    assert "Paris" in spd_text and "Paris" in sync_text, (spd_text, sync_text)


def test_loading_prints_a_bar_and_one_summary_not_a_line_per_tensor(tokenized_tiny):
    r = subprocess.run([sys.executable, str(ROOT / "launch/infer.py"), "--model", str(tokenized_tiny[0]),
                        "--tp", "2", "--max-new-tokens", "2", "--no-warmup", "--prompt", "hi"],
                       capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loading model.layers" not in r.stderr
    summary = [ln for ln in r.stderr.replace("\r", "\n").splitlines() if ln.startswith("loaded ")]
    assert len(summary) == 1 and "tensors" in summary[0], r.stderr[-2000:]


def _evaluate(*args):
    env = dict(ENV, SPD_JAX_CACHE="/nonexistent-spd-cache")  # the default BIG-bench tasks are not there
    return subprocess.run([sys.executable, str(ROOT / "launch/evaluate.py"), *map(str, args), "--json"],
                          capture_output=True, text=True, env=env, timeout=300)


def test_ppl_file_is_scored_whole_and_says_so(tokenized_tiny, tmp_path):
    model, corpus = tokenized_tiny
    docs = [json.loads(ln)["text"] for ln in corpus.read_text().splitlines()]
    f = tmp_path / "chapter.txt"
    f.write_text("\n\n".join(docs[:8]))  # 8 paragraphs: the held-out rule would keep only 4 of them
    r = _evaluate("--model", model, "--tp", "2", "--ppl-file", f, "--ppl-len", "32", "--ppl-tokens", "100000",
                  "--tasks", "none")
    assert r.returncode == 0, r.stderr[-2000:]
    whole = json.loads(r.stdout)["perplexity"]
    assert whole["split"] == "all"
    r = _evaluate("--model", model, "--tp", "2", "--ppl-file", f, "--ppl-len", "32", "--ppl-tokens", "100000",
                  "--tasks", "none", "--ppl-split", "eval")
    assert r.returncode == 0, r.stderr[-2000:]
    held = json.loads(r.stdout)["perplexity"]
    assert held["split"] == "eval" and held["tokens"] < whole["tokens"] / 1.5


def test_task_file_alone_is_the_evaluation(tokenized_tiny, tmp_path):
    f = tmp_path / "piqa.jsonl"
    f.write_text("\n".join(json.dumps({"goal": f"goal {i}", "sol1": "a b", "sol2": "c d", "label": i % 2})
                           for i in range(3)))
    r = _evaluate("--model", tokenized_tiny[0], "--task-file", f, "--ppl-tokens", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert list(json.loads(r.stdout)["tasks"]) == ["piqa"] and json.loads(r.stdout)["tasks"]["piqa"]["n"] == 3
    r = _evaluate("--model", tokenized_tiny[0], "--ppl-tokens", "0")  # nothing named: the defaults
    assert r.returncode == 2 and "BIG-bench task" in r.stderr
