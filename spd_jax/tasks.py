"""Multiple-choice task data: BIG-bench JSON tasks (the offline default) and lm-evaluation-harness-style
local JSONL files for the paper's tasks (ARC, HellaSwag, PIQA, WinoGrande, SciQ, LAMBADA).

BIG-bench tasks are obtained from the package index: `python launch/evaluate.py --download-bigbench`
downloads the `bigbench==1.0.0` source distribution with pip (without installing it) and extracts the
task files into the cache directory ($SPD_JAX_CACHE or ~/.cache/spd-jax, under bigbench/).
"""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from spd_jax.config import ConfigError
from spd_jax.data import cache_dir
from spd_jax.evaluation import MCItem

DEFAULT_TASKS = ("social_iqa", "goal_step_wikihow/goal_inference", "goal_step_wikihow/step_inference",
                 "physical_intuition", "general_knowledge")
BIGBENCH_VERSION = "1.0.0"


def bigbench_dir() -> Path:
    return cache_dir() / "bigbench"


def find_bigbench_task(name: str, search: list[Path] | None = None) -> Path:
    dirs = list(search or []) + [bigbench_dir()]
    env = os.environ.get("SPD_JAX_BIGBENCH_DIR")
    if env:
        dirs.insert(0, Path(env))
    for d in dirs:
        p = Path(d) / name / "task.json"
        if p.is_file():
            return p
    raise ConfigError(f"BIG-bench task {name!r} not found in {[str(d) for d in dirs]}; "
                      f"run: python launch/evaluate.py --download-bigbench")


def _scores(target_scores):
    if isinstance(target_scores, str):  # some task files store the dict as a string
        target_scores = ast.literal_eval(target_scores)
    return target_scores


def load_bigbench(path: Path, limit: int | None = None) -> list[MCItem]:
    """BIG-bench JSON multiple-choice task, formatted as BIG-bench's JSON tasks do zero-shot:
    task_prefix + 'Q: ' + input [+ '\\n  choice: ...' lines when append_choices_to_input] + '\\nA:'."""
    try:
        task = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not a readable BIG-bench task: {e}") from None
    if not isinstance(task, dict) or not isinstance(task.get("examples", []), list):
        raise ConfigError(f"{path}: not a BIG-bench task (expected a JSON object with an 'examples' list)")
    prefix = str(task.get("task_prefix", ""))
    q = str(task.get("example_input_prefix", "\nQ: ")).lstrip("\n")
    a = str(task.get("example_output_prefix", "\nA: ")).rstrip()
    items = []
    for n, ex in enumerate(task.get("examples", []), 1):
        if not isinstance(ex, dict) or "target_scores" not in ex:
            continue
        try:
            scores = _scores(ex["target_scores"])
            if not isinstance(scores, dict) or not scores:
                raise TypeError(f"target_scores is a {type(scores).__name__}, not a non-empty mapping")
            choices = list(scores)
            gold = max(range(len(choices)), key=lambda i: float(scores[choices[i]]))
            ctx = prefix + q + str(ex["input"])
        except (KeyError, TypeError, ValueError, SyntaxError, IndexError) as e:
            raise ConfigError(f"{path}: example {n} is not a valid multiple-choice example ({type(e).__name__}: "
                              f"{e}; expected 'input' and a 'target_scores' mapping of choice -> score)") from None
        if task.get("append_choices_to_input"):
            ctx += "".join(f"\n  choice: {c}" for c in choices)
        items.append(MCItem(ctx + a, [" " + c for c in choices], gold))
        if limit and len(items) >= limit:
            break
    if not items:
        raise ConfigError(f"{path}: no multiple-choice examples (target_scores) found")
    return items


# ----------------------------------------------------------------------------- lm-eval-style JSONL

def _preprocess_hellaswag(text: str) -> str:
    text = text.strip().replace(" [title]", ". ")
    text = re.sub(r"\[.*?\]", "", text)
    return text.replace("  ", " ")


def _arc(d):
    ch = d["choices"]
    return MCItem(f"Question: {d['question']}\nAnswer:", [" " + t for t in ch["text"]], ch["label"].index(d["answerKey"]))


def _hellaswag(d):
    ctx = d["ctx_a"] + " " + d["ctx_b"].capitalize() if "ctx_a" in d else d["ctx"]
    return MCItem(_preprocess_hellaswag(d["activity_label"] + ": " + ctx),
                  [" " + _preprocess_hellaswag(e) for e in d["endings"]], int(d["label"]))


def _piqa(d):
    return MCItem(f"Question: {d['goal']}\nAnswer:", [" " + d["sol1"], " " + d["sol2"]], int(d["label"]))


def _sciq(d):
    choices = [d["distractor1"], d["distractor2"], d["distractor3"], d["correct_answer"]]
    return MCItem(f"{d['support'].strip()}\nQuestion: {d['question']}\nAnswer:".lstrip(), [" " + c for c in choices], 3)


def _winogrande(d):
    # lm-eval's partial scoring: the context is the sentence up to the blank with each option filled
    # in, the continuation is the rest; here the options become the contexts, so we flip it: score the
    # shared suffix after each option-filled prefix. Represented as choices = full option prefixes.
    i = d["sentence"].index("_")
    suffix = " " + d["sentence"][i + 1:].strip()
    opts = [d["sentence"][:i] + d["option1"], d["sentence"][:i] + d["option2"]]
    return [MCItem(o, [suffix], 0) for o in opts], int(d["answer"]) - 1


def _lambada(d):
    text = d["text"]
    ctx, last = text.rsplit(" ", 1)
    return MCItem(ctx, [" " + last], 0)


JSONL_FORMATS = {"arc": _arc, "arc_easy": _arc, "arc_challenge": _arc, "hellaswag": _hellaswag, "piqa": _piqa,
                 "sciq": _sciq}


def detect_format(d: dict) -> str:
    if "answerKey" in d and "choices" in d:
        return "arc"
    if "endings" in d:
        return "hellaswag"
    if "sol1" in d:
        return "piqa"
    if "correct_answer" in d and "distractor1" in d:
        return "sciq"
    if "option1" in d and "sentence" in d:
        return "winogrande"
    if set(d) >= {"text"} and len(d) <= 2:
        return "lambada"
    raise ConfigError(f"unrecognised JSONL task record with keys {sorted(d)}")


def load_jsonl_task(path: Path, limit: int | None = None) -> tuple[str, list]:
    """Returns (format, items). For winogrande, items are (pair of MCItems, gold); for lambada, MCItems
    whose single choice is the target word (scored by greedy match, see evaluate_lambada)."""
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    raise ConfigError(f"{path}:{n}: invalid JSON") from None
            if limit and len(rows) >= limit:
                break
    if not rows:
        raise ConfigError(f"{path}: empty task file")
    if not isinstance(rows[0], dict):
        raise ConfigError(f"{path}:1: expected a JSON object per line, got {type(rows[0]).__name__}")
    fmt = detect_format(rows[0])
    parse = {"winogrande": _winogrande, "lambada": _lambada}.get(fmt) or JSONL_FORMATS[fmt]
    items = []
    for n, r in enumerate(rows, 1):
        try:
            items.append(parse(r))
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            keys = sorted(r) if isinstance(r, dict) else type(r).__name__
            raise ConfigError(f"{path}: record {n} is not a valid {fmt} record ({type(e).__name__}: {e}; "
                              f"keys {keys})") from None
    return fmt, items


def load_task(spec: str, limit: int | None = None, search: list[Path] | None = None) -> tuple[str, str, list]:
    """A task name (BIG-bench, from the cache) or a path (task.json or .jsonl). Returns (name, format, items)."""
    p = Path(spec)
    if p.suffix == ".jsonl":
        fmt, items = load_jsonl_task(p, limit)
        return p.stem, fmt, items
    if p.suffix == ".json" or p.is_file():
        return p.parent.name, "bigbench", load_bigbench(p, limit)
    return spec, "bigbench", load_bigbench(find_bigbench_task(spec, search), limit)


# ----------------------------------------------------------------------------- download

def extract_bigbench(sdist: Path, dest: Path, tasks=DEFAULT_TASKS) -> list[Path]:
    """Extract `bigbench/benchmark_tasks/<task>/task.json` for each task from the sdist tarball."""
    out = []
    with tarfile.open(sdist) as tf:
        members = {m.name: m for m in tf.getmembers() if m.name.endswith("/task.json")}
        for t in tasks:
            want = f"bigbench/benchmark_tasks/{t}/task.json"
            hit = [n for n in members if n.endswith(want)]
            if not hit:
                raise ConfigError(f"{sdist}: no {want}")
            target = dest / t / "task.json"
            target.parent.mkdir(parents=True, exist_ok=True)
            with tf.extractfile(members[hit[0]]) as src:
                tmp = target.with_suffix(".json.tmp")
                tmp.write_bytes(src.read())
                tmp.replace(target)
            out.append(target)
    return out


def download_bigbench(dest: Path | None = None, tasks=DEFAULT_TASKS) -> list[Path]:
    dest = dest or bigbench_dir()
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"bigbench=={BIGBENCH_VERSION}", "-d", tmp]
        print("running:", " ".join(cmd), "(about 358 MB)", flush=True)
        r = subprocess.run(cmd)
        if r.returncode:
            raise ConfigError("pip could not download the bigbench source distribution")
        sdists = list(Path(tmp).glob("bigbench-*.tar.gz"))
        if not sdists:
            raise ConfigError("pip downloaded no bigbench-*.tar.gz")
        return extract_bigbench(sdists[0], dest, tasks)
