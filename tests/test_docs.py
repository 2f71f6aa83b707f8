"""The docs a user reads: generated tables equal their raw data, every command's --help runs, the project speaks
of itself alone."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE_SCRIPT = ROOT / "scripts/bench_table.py"
DOCS_WITH_TABLES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _tables(*args):
    return subprocess.run([sys.executable, str(TABLE_SCRIPT), "--docs", *map(str, args)], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def test_committed_tables_equal_their_raw_data():
    r = _tables(*DOCS_WITH_TABLES, "--check")
    assert r.returncode == 0, r.stderr
    n = sum(p.read_text().count("<!-- table: ") for p in DOCS_WITH_TABLES)
    assert n >= 8, f"only {n} generated tables"


def _block(text: str, kind: str) -> tuple[str, list[str]]:
    """The spec and lines of the first generated table of `kind` in `text`."""
    m = re.search(r"<!-- table: (" + kind + r" [^>]*?) -->\n(.*?)\n<!-- end table -->", text, re.S)
    assert m, kind
    return m.group(1), m.group(2).splitlines()


def test_a_cut_in_the_summary_is_the_raw_runs_end_to_end_ratio():
    # independent of the generator: read the raw JSON here and recompute one cell of each summary table
    for doc in (ROOT / "README.md", ROOT / "docs/benchmarks.md"):
        spec, lines = _block(doc.read_text(), "cuts")
        files = [a for a in spec.split() if a.endswith(".json")]
        for a in spec.split():
            if a.startswith("@"):
                files += [x.split("#")[0].strip() for x in (ROOT / a[1:]).read_text().splitlines()]
        # the last 70B TP 4 nvlink run with an r=1.00 row is the one the cell shows
        path = [f for f in files if "70b-tp4-nvlink" in f and '"r=1.00"' in (ROOT / f).read_text()][-1]
        d = json.loads((ROOT / path).read_text())
        e2e = {r["label"]: r["e2e_ms"] for r in d["rows"]}
        want = 100 * (1 - e2e["r=1.00"] / e2e["r=0.00"])
        row = next(line for line in lines if line.startswith("| LLaMA-2-70B | 4 |"))
        header = [c.strip() for c in lines[0].strip("|").split("|")]
        cells = [c.strip() for c in row.strip("|").split("|")]
        got = cells[header.index("SPD on 100% of blocks, nvlink")]
        assert float(got.rstrip("%")) == pytest.approx(-want, abs=0.051), (doc.name, got, want)


def test_the_check_fails_on_an_edited_number_and_on_a_missing_raw_file(tmp_path):
    text = (ROOT / "docs/benchmarks.md").read_text()
    spec, lines = _block(text, "ab")
    row = next(line for line in lines if line.startswith("| default |"))
    cells = row.split("|")
    cells[7] = " 9.999 "  # the sync tpot
    edited = tmp_path / "edited.md"
    edited.write_text(text.replace(row, "|".join(cells), 1))
    r = _tables(edited, "--check")
    assert r.returncode == 1 and "differ from their raw data" in r.stderr, r.stderr

    missing = tmp_path / "missing.md"
    missing.write_text("<!-- table: rows docs/bench/no-such-run/x.json -->\n<!-- end table -->\n")
    r = _tables(missing, "--check")
    assert r.returncode == 1 and "docs/bench/no-such-run/x.json: no such raw file" in r.stderr, r.stderr

    unclosed = tmp_path / "unclosed.md"
    unclosed.write_text(f"<!-- table: {spec} -->\n| a |\n")
    r = _tables(unclosed, "--check")
    assert r.returncode == 1 and "has no `<!-- end table -->`" in r.stderr, r.stderr

    # without --check the same command repairs the edited file
    assert _tables(edited).returncode == 0
    assert edited.read_text() == text


def test_results_md_is_generated_from_results_json(tmp_path):
    from spd_jax.pipeline.study import write_results_md

    study = json.loads((ROOT / "docs/results.json").read_text())
    shutil.copy(ROOT / "docs/results.md", tmp_path / "results.md")  # its hand-written tail is kept on regeneration
    write_results_md(study, tmp_path / "results.md", tmp_path / "results.png", study.get("command", ""))
    assert (tmp_path / "results.md").read_text() == (ROOT / "docs/results.md").read_text()


def test_every_raw_folder_is_in_the_index():
    index = (ROOT / "docs/bench/README.md").read_text()
    folders = [p.name for p in (ROOT / "docs/bench").iterdir() if p.is_dir()]
    assert folders
    for name in folders:
        assert re.fullmatch(r"\d{4}-\d\d-\d\d-[a-z0-9-]+", name), f"docs/bench/{name}: not named date-card-topic"
        assert f"`{name}/`" in index, f"docs/bench/{name} is not listed in docs/bench/README.md"


def _tracked_text_files():
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    for name in out.stdout.splitlines():
        p = ROOT / name
        if p.suffix in {".gz", ".png", ".gguf", ".safetensors", ".whl"} or not p.is_file():
            continue
        try:
            yield name, p.read_text()
        except UnicodeDecodeError:
            continue


def test_the_project_speaks_of_itself_alone():
    # how the work was organised is not the user's business: no numbered work periods or device calls
    words = re.compile(r"\b(" + "sess" + r"ions? [0-9]+|" + "cal" + r"ls? [0-9]+|" + "le" + r"nt)\b", re.I)
    hits = [f"{name}:{text[:m.start()].count(chr(10)) + 1}: {m.group(0)}"
            for name, text in _tracked_text_files() for m in words.finditer(text)]
    assert not hits, "\n".join(hits[:30])


COMMANDS = ["spd-infer", "spd-train-distill", "spd-evaluate", "spd-study", "spd-bench", "spd-bench-peer",
            "spd-local-cluster", "spd-serve"]


def test_every_command_and_script_answers_help():
    """Each installed command, each launch/ script and each user script in scripts/ prints its usage and exits 0
    (started together: a `--help` imports little, but eight Python start-ups in a row are slow on 2 cores)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    runs = {}
    for cmd in COMMANDS:
        exe = shutil.which(cmd)
        assert exe, f"{cmd} is not installed (pip install -e .)"
        runs[cmd] = [exe, "--help"]
    for p in sorted((ROOT / "launch").glob("*.py")):
        runs[f"launch/{p.name}"] = [sys.executable, str(p), "--help"]
    for name in ("bench_table.py", "bench_serve.py", "profile_decode.py", "check_attention_kernel.py"):
        runs[f"scripts/{name}"] = [sys.executable, str(ROOT / "scripts" / name), "--help"]
    procs = {k: subprocess.Popen(v, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for k, v in runs.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"{name} --help: exit {proc.returncode}\n{err[-2000:]}"
        assert "usage" in out.lower(), f"{name} --help printed no usage:\n{out[:500]}"


def _example_lines():
    """(where, command, args) of every `python launch/X.py ...` example in the commands' --help texts, the README
    and docs/ (lines with a `...` placeholder are templates, not examples)."""
    import importlib

    sources = []
    for name in ("infer", "evaluate", "train_distill", "serve", "bench"):
        sources.append((f"spd-{name.replace('_', '-')} --help", importlib.import_module(f"spd_jax.commands.{name}").__doc__))
    for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = p.read_text()
        # an inline `code span` may wrap across lines of prose; fenced blocks stay line by line
        spans = [m.group(1).replace("\n", " ") for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text)]
        sources.append((p.name, "\n".join(spans + text.splitlines())))
    for where, text in sources:
        for line in text.splitlines():
            m = re.search(r"python launch/(infer|evaluate|train_distill|serve|bench)\.py((?:[^`#&|;]|\\\\)*)", line)
            if m and "..." not in line and "OUT" not in m.group(2) and not m.group(2).rstrip().endswith("--out"):
                yield where, m.group(1), m.group(2).strip()


def test_every_example_command_line_parses_with_its_command():
    """A flag renamed or removed makes its examples fail here, not in a user's shell."""
    import importlib
    import shlex

    checked = 0
    for where, cmd, args in _example_lines():
        parse_args = importlib.import_module(f"spd_jax.commands.{cmd}").parse_args
        try:
            parse_args(shlex.split(args))
        except SystemExit as e:
            raise AssertionError(f"{where}: `python launch/{cmd}.py {args}` does not parse (exit {e.code})") from None
        checked += 1
    assert checked >= 25, checked
