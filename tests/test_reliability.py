"""Long jobs cannot silently ruin a model; every user-input error is one `error:` line (docs/errors.md).

Each test here failed on the code before this change (issue: divergence guard, resume config check,
one run per output folder, one-line errors, silent wrong values, late checks).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import chex
import numpy as np
import pytest

from spd_jax.config import ConfigError, load_run_config
from spd_jax.loading import load_params, open_model
from spd_jax.pipeline.distill import BlockDistiller, DistillConfig
from spd_jax.pipeline.ops import ModelOps
from spd_jax.pipeline.config import config_differences, load_pipeline_config
from spd_jax.plan import modes_from_plan
from spd_jax.runlock import RunLock
from spd_jax.runtime import Engine, build_model_def

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")


def _cli(script, *args, timeout=300):
    return subprocess.run([sys.executable, str(ROOT / "launch" / script), *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=timeout)


def _assert_one_line_error(r, match):
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and match in errs[0], r.stderr[-3000:]


# ----------------------------------------------------------------------------- 1. distillation guard


def _tiny_block(tiny_models, tp=2):
    lm = open_model(tiny_models["llama"][0])
    eng = Engine.create(build_model_def(lm.cfg, tp))
    params = load_params(eng, lm.source)
    ops = ModelOps(eng, batch_size=4)
    tokens = np.random.RandomState(0).randint(3, 100, size=(8, 16)).astype(np.int32)
    return ops, params, ops.hidden_states(params, tokens)


def test_b2b_that_ends_worse_keeps_the_original_weights(tiny_models):
    """A blow-up the in-training guard cannot see: one Adam step of lr 0.5 moves every weight by ~0.5. The
    loss it records is the one before the update, so only the final full-data check catches it."""
    ops, params, h = _tiny_block(tiny_models)
    d = BlockDistiller(ops, DistillConfig(lr=0.5, epochs=1, batch_size=8, optimizer="adam"))
    res = d.distill(1, params["layers"][1], h[1], h[2], progress=False)
    assert res.status == "worse", (res.status, res.initial_mse, res.message)
    assert "kept the original weights" in res.message
    chex.assert_trees_all_equal(res.params, params["layers"][1])
    assert res.final_mse == res.initial_mse  # the block's error is what the kept weights give


def test_divergence_guard_compares_a_batch_with_its_own_initial_error(tiny_models):
    """A heavy-tailed batch (one sample 100x the others' error) is not 'diverged' just because its loss is
    far above the full-data mean before any update."""
    ops, params, h = _tiny_block(tiny_models)
    x, y = h[1].copy(), h[2].copy()
    y[0] += 30.0 * np.abs(y[0]).mean() + 30.0  # sample 0's target is far off: its error dominates
    d = BlockDistiller(ops, DistillConfig(lr=1e-6, epochs=1, batch_size=1, diverge_factor=3.0))
    errs = d.errors(params["layers"][1], x, y)
    assert errs.max() > 3.0 * errs.mean()  # the old guard (batch loss vs full mean) would have fired
    res = d.distill(1, params["layers"][1], x, y, progress=False)
    assert res.status in ("ok", "worse") and res.status != "diverged", res.message


@pytest.mark.parametrize("flag,value,msg", [("--lr", "-1", "distill.lr must be > 0"),
                                            ("--lr", "0", "distill.lr must be > 0"),
                                            ("--epochs", "-1", "distill.epochs must be >= 0"),
                                            ("--calib-samples", "0", "calib_samples must be >= 1"),
                                            ("--ratio", "nan", "ratio must be a finite number")])
def test_bad_training_values_refused_before_any_work(tmp_path, flag, value, msg):
    out = tmp_path / "run"
    t0 = time.time()
    r = _cli("train_distill.py", "--out", out, flag, value)
    _assert_one_line_error(r, msg)
    assert not out.exists()  # nothing created
    assert time.time() - t0 < 60


# ----------------------------------------------------------------------------- 2. resume checks its config


def test_config_differences_names_fields_and_allows_safe_ones():
    a = {"ratio": 0.5, "save_every": 25, "distill": {"epochs": 10, "lr": None}, "calib_samples": 16}
    b = {"ratio": 0.7, "save_every": 5, "distill": {"epochs": 3, "lr": None}, "calib_samples": 16}
    assert config_differences(a, b) == ["distill.epochs: 10 -> 3", "ratio: 0.5 -> 0.7"]
    assert config_differences(a, dict(a, save_every=1)) == []


def test_resume_with_another_config_is_refused(tokenized_tiny, tmp_path):
    model, corpus = tokenized_tiny
    out = tmp_path / "run"
    base = ["--model", model, "--tp", "2", "--emulate", "--data", corpus, "--calib-samples", "4", "--calib-len", "16",
            "--eval-tokens", "64", "--ratio", "0.5", "--epochs", "0", "--no-head-grouping", "--no-progress",
            "--out", out]
    r = _cli("train_distill.py", *base, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    i = base.index("--ratio")
    changed = base[:i + 1] + ["1.0"] + base[i + 2:]
    j = changed.index("--calib-samples")
    changed[j + 1] = "6"
    r = _cli("train_distill.py", *changed, "--resume")
    _assert_one_line_error(r, "--resume with a config that differs")
    assert "ratio: 0.5 -> 1.0" in r.stderr and "calib_samples: 4 -> 6" in r.stderr
    # a safe field may change; the same config resumes (the run was complete: it just reports again)
    r = _cli("train_distill.py", *base, "--resume", "--save-every", "3", timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads((out / "report.json").read_text())["config"]["ratio"] == 0.5


# ----------------------------------------------------------------------------- 3. one writer per --out


def test_lock_refuses_a_second_writer_and_takes_over_a_stale_one(tmp_path):
    with RunLock(tmp_path):
        owner = json.loads((tmp_path / ".lock").read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(ConfigError, match=rf"in use by another run \(pid {os.getpid()} on this host"):
            RunLock(tmp_path).acquire()
    assert not (tmp_path / ".lock").exists()
    # a lock left by a process that no longer exists on this host is stale
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (tmp_path / ".lock").write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    with RunLock(tmp_path):
        assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    # another host's lock cannot be checked from here: refused, with the way out
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with pytest.raises(ConfigError, match="host 'elsewhere'.*delete"):
        RunLock(tmp_path).acquire()


def test_second_pipeline_on_the_same_out_is_refused_and_harms_nothing(tokenized_tiny, tmp_path):
    model, corpus = tokenized_tiny
    out = tmp_path / "run"
    args = ["--model", model, "--tp", "2", "--emulate", "--data", corpus, "--calib-samples", "4", "--calib-len",
            "16", "--eval-tokens", "64", "--ratio", "1.0", "--tau1=-1e9", "--tau2=1e9", "--epochs", "6",
            "--distill-batch-size", "1", "--save-every", "1", "--no-head-grouping", "--no-progress", "--out", out]
    first = subprocess.Popen([sys.executable, str(ROOT / "launch/train_distill.py"), *map(str, args)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV)
    for line in first.stdout:  # wait until the first run is writing checkpoints
        if "[checkpoint] saved" in line:
            break
    second = _cli("train_distill.py", *args)
    rest = first.stdout.read()
    first.wait(timeout=600)
    _assert_one_line_error(second, "is in use by another run")
    assert first.returncode == 0, rest[-3000:]
    assert (out / "report.json").is_file() and not (out / ".lock").exists()


# ----------------------------------------------------------------------------- 4. one-line errors


def test_one_line_errors_for_bad_files_and_values(tmp_path, tiny_models):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("tp: [3\nratio: 0.5\n")
    _assert_one_line_error(_cli("train_distill.py", "--config", bad_yaml, "--out", tmp_path / "o"), "not valid YAML")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    _assert_one_line_error(_cli("train_distill.py", "--out", a_file), "is an existing file")
    typed = tmp_path / "typed.yaml"
    typed.write_text("tp: '3'\n")
    _assert_one_line_error(_cli("train_distill.py", "--config", typed, "--out", tmp_path / "o"), "tp must be int")
    typed.write_text("tp: 3\ndistill:\n  epochs: 1.5\n")
    _assert_one_line_error(_cli("train_distill.py", "--config", typed, "--out", tmp_path / "o"),
                           "distill: epochs must be int")
    typed.write_text("distill:\n  optimizer: adamx\n")
    _assert_one_line_error(_cli("train_distill.py", "--config", typed, "--out", tmp_path / "o"), "optimizer must be")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"blocks": 5}))
    model = tiny_models["llama"][0]
    _assert_one_line_error(_cli("infer.py", "--model", model, "--spd-plan", plan, "--prompt", "hi"), "'blocks' list")
    rc = tmp_path / "run.yaml"
    rc.write_text("generation:\n  max_new_tokens: many\n")
    _assert_one_line_error(_cli("infer.py", "--config", rc, "--model", model), "max_new_tokens must be int")
    assert not (tmp_path / "o").exists()


def test_bad_task_records_are_one_line_errors_before_the_model_loads(tmp_path, tiny_models):
    f = tmp_path / "arc.jsonl"
    f.write_text(json.dumps({"question": "q", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "A"})
                 + "\n" + json.dumps({"question": "q2", "answerKey": "B", "choices": {"text": ["a"]}}) + "\n")
    t0 = time.time()
    r = _cli("evaluate.py", "--model", "/nonexistent/model", "--task-file", f, "--ppl-tokens", "0")
    # the task file is read first: its error comes before the (also bad) model path is looked at
    _assert_one_line_error(r, "record 2 is not a valid arc record")
    assert time.time() - t0 < 60


# ----------------------------------------------------------------------------- 5. silent wrong values


def test_silent_wrong_values_are_refused(tmp_path, tiny_models):
    with pytest.raises(ConfigError, match="temperature must be a finite number"):
        load_run_config(None, {"generation.temperature": float("nan")})
    blocks = [{"index": 0, "mode": "spd"}] * 3
    with pytest.raises(ConfigError, match="block 0 is listed more than once"):
        modes_from_plan({"n_layers": 3, "blocks": blocks}, 3)
    with pytest.raises(ConfigError, match=r"block\(s\) \[2\] are not listed"):
        modes_from_plan({"blocks": [{"index": 0, "mode": "spd"}, {"index": 1, "mode": "sync"}], "n_layers": 3}, 3)
    model = tiny_models["llama"][0]
    for limit in ("0", "-3"):
        _assert_one_line_error(_cli("evaluate.py", "--model", model, "--limit", limit, "--ppl-tokens", "0"),
                               "--limit must be >= 1")
    _assert_one_line_error(_cli("infer.py", "--model", model, "--temperature", "nan", "--prompt", "hi"),
                           "temperature must be a finite number")


def test_pipeline_config_and_distill_config_share_the_typed_loader(tmp_path):
    f = tmp_path / "p.yaml"
    f.write_text("ratio: 0.25\ndistill:\n  epochs: 2\n  schedule: cosine\n")
    pc = load_pipeline_config(str(f), {"distill.lr": 1e-4})
    assert (pc.ratio, pc.distill.epochs, pc.distill.schedule, pc.distill.lr) == (0.25, 2, "cosine", 1e-4)
    for text, msg in [("distill:\n  optimizer: adamx\n", "optimizer must be"),
                      ("distill: 3\n", "expected a mapping"), ("- 1\n- 2\n", "expected a mapping of keys"),
                      ("save_every: 0\n", "save_every must be >= 1")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_pipeline_config(str(f), {})


# ----------------------------------------------------------------------------- 6. no half-made folders


def test_failed_fresh_run_leaves_no_folder(tmp_path):
    out = tmp_path / "new" / "run"
    r = _cli("train_distill.py", "--model", tmp_path / "missing-model", "--out", out)
    _assert_one_line_error(r, "model path not found")
    assert not out.exists() and not (out / "checkpoint").exists()


# ----------------------------------------------------------------------------- 7. context, inputs, folders


def test_windows_beyond_the_context_are_refused_for_every_family(tiny_models, tmp_path):
    """An OPT model has no position row past its context: a 256-token window on a 128-position model used to
    score NaN (`perplexity: nan`) and the pipeline to fail later on tau1=nan. Now each entry point refuses."""
    from spd_jax.commands.evaluate import main as evaluate_main
    from spd_jax.config import ContextLengthError
    from spd_jax.pipeline.config import PipelineConfig
    from spd_jax.pipeline.run import run_pipeline

    opt = tiny_models["opt"][0]
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"w{i}" for i in range(3000)))
    with pytest.raises(ContextLengthError, match="--ppl-len: a perplexity window of 256 tokens exceeds the model's "
                                                 "context of 128"):
        evaluate_main(["--model", str(opt), "--tp", "2", "--ppl-len", "256", "--ppl-file", str(corpus),
                       "--tasks", "none"])
    out = tmp_path / "run"
    with pytest.raises(ContextLengthError, match="calib_len: a calibration sequence of 256 tokens"):
        run_pipeline(PipelineConfig(model=str(opt), tp=2, emulate=True, data=str(corpus), calib_len=256), out,
                     progress=False)
    assert not out.exists()
    for kind in ("llama", "qwen3", "mistral"):
        cfg = open_model(tiny_models[kind][0]).cfg
        cfg.check_fits(128, "a window")
        with pytest.raises(ContextLengthError, match="129 tokens exceeds the model's context of 128"):
            cfg.check_fits(129, "a window")


def test_a_run_that_loses_the_lock_race_removes_nothing(tmp_path, monkeypatch):
    """Two runs start on a new --out: the loser created nothing it may remove, and the winner's folder and lock
    stay. Reproduced deterministically: the winner takes the lock just before the loser tries."""
    from spd_jax.pipeline.config import PipelineConfig
    from spd_jax.pipeline.run import run_pipeline

    out = tmp_path / "new" / "run"
    real = RunLock.acquire

    def winner_first(self):
        (self.dir / ".lock").write_text(json.dumps({"pid": 1, "host": socket.gethostname(), "command": "winner"}))
        return real(self)

    monkeypatch.setattr(RunLock, "acquire", winner_first)
    with pytest.raises(ConfigError, match="in use by another run"):
        run_pipeline(PipelineConfig(model="/nonexistent"), out, progress=False)
    assert json.loads((out / ".lock").read_text())["command"] == "winner"


def test_bench_inputs_are_checked_before_any_work(tmp_path):
    from spd_jax.commands.bench import check_inputs, parse_args

    def check(*argv):
        check_inputs(parse_args(["--shape", "tiny", "--tp", "2", *map(str, argv)]))

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="--link-reference .* is not a readable JSON file"):
        check("--link-reference", bad)
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"shape": "llama2-7b", "tp": 4, "allreduce": []}))
    with pytest.raises(ConfigError, match="measured for llama2-7b at TP 4, this run is tiny at TP 2"):
        check("--link-reference", other)
    peer = tmp_path / "peer.json"
    peer.write_text(json.dumps({"tp": 2, "device": "x", "ttft_ms": 1.0}))
    with pytest.raises(ConfigError, match="missing tpot_ms, e2e_ms"):
        check("--peer-json", peer)
    with pytest.raises(ConfigError, match="--json .* cannot be written: Not a directory"):
        check("--json", peer / "out.json")
    with pytest.raises(ConfigError, match="unknown shape|not a known shape"):
        check_inputs(parse_args(["--shape", "bogus"]))
    with pytest.raises(ConfigError, match="--spd-ratios: 'x' is not a number"):
        check("--spd-ratios", "0,x")
    with pytest.raises(ConfigError, match=r"--spd-ratios: 1.5 is out of range"):
        check("--spd-ratios", "0,1.5")
    with pytest.raises(ConfigError, match="--allreduce-sizes: '8k' is not an integer"):
        check("--allreduce-sizes", "8k")
    with pytest.raises(ConfigError, match="--attention-tune: expected comma-separated key=int .* got 'warps=8'"):
        check("--attention-tune", "warps=8")
    with pytest.raises(ConfigError, match="decode_chunk must be >= 1"):
        check("--decode-chunk", "0")
    ok = tmp_path / "ok.json"
    check("--json", ok, "--spd-ratios", "0,0.5")
    assert not ok.exists()  # the probe leaves nothing behind
    t0 = time.time()
    _assert_one_line_error(_cli("bench.py", "--shape", "tiny", "--tp", "2", "--link-reference", bad),
                           "is not a readable JSON file")
    assert time.time() - t0 < 60


def test_disk_errors_are_one_line(tmp_path, monkeypatch, capsys, tiny_models):
    """A full disk, a read-only folder and a path under a file each end in one `error:` line naming the path
    and the cause (was: 580 lines and 7 tracebacks from orbax's threads for a full disk)."""
    import errno
    import shutil
    from collections import namedtuple

    from spd_jax import cli
    from spd_jax.checkpoint import Checkpointer

    lm = open_model(tiny_models["llama"][0])
    eng = Engine.create(build_model_def(lm.cfg, 2))
    params = load_params(eng, lm.source)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20))
    ck = Checkpointer(tmp_path / "ck")
    with pytest.raises(OSError) as e:
        ck.save(1, eng, params, {"stage": "done"})
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(ck.dir)
    assert ck.latest() is None  # nothing half-written
    with pytest.raises(SystemExit) as ex:
        cli.die(e.value)
    err = capsys.readouterr().err.strip().splitlines()
    assert ex.value.code == 2 and len(err) == 1
    assert err[0].startswith(f"error: {ck.dir}: No space left on device") and "--resume" in err[0]
    a_file = tmp_path / "f"
    a_file.write_text("x")
    _assert_one_line_error(_cli("train_distill.py", "--out", a_file / "run"), f"{a_file / 'run'}: Not a directory")


def test_read_only_and_full_file_systems(tmp_path, tokenized_tiny):
    """The real thing on tmpfs mounts (root on Linux): a read-only --out, and a disk that fills at the final
    save of a pipeline run, which then resumes once there is room."""
    ro, small = tmp_path / "ro", tmp_path / "small"
    ro.mkdir()
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root on Linux)")
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
        _assert_one_line_error(_cli("train_distill.py", "--out", ro / "run"),
                               f"{ro / 'run'}: Read-only file system")
        model, corpus = tokenized_tiny  # blocks of a few KB, but a 6 MB embedding in the final full save
        args = ["--model", model, "--tp", "2", "--emulate", "--data", corpus, "--calib-samples", "2", "--calib-len",
                "16", "--eval-tokens", "64", "--ratio", "1.0", "--tau1=-1e9", "--tau2=1e9", "--epochs", "1",
                "--no-head-grouping", "--no-progress", "--out", small / "run"]
        r = _cli("train_distill.py", *args, timeout=600)
        _assert_one_line_error(r, "No space left on device")
        assert "--resume" in r.stderr and (small / "run" / "checkpoint").is_dir()
        subprocess.run(["mount", "-o", "remount,size=16m", str(small)], check=True)
        r = _cli("train_distill.py", *args, "--resume", timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        assert (small / "run" / "report.json").is_file()
    finally:
        for d in (ro, small):
            subprocess.run(["umount", str(d)], capture_output=True)


def test_spawn_combinations_are_checked_before_any_process_starts(tiny_models):
    import argparse

    from spd_jax.distributed import maybe_spawn

    def ns(spawn, tp=None):
        return argparse.Namespace(spawn=spawn, tp=tp, coordinator=None, num_processes=None, process_id=None,
                                  distributed=False)

    assert maybe_spawn(ns(None), "x.py", []) is None
    with pytest.raises(ConfigError, match="--spawn must be >= 1"):
        maybe_spawn(ns(0), "x.py", [])  # was: silently off
    with pytest.raises(ConfigError, match="TP degree must be a multiple of 2"):
        maybe_spawn(ns(2), "x.py", [], tp=1)  # was: process 1 crashed with a traceback
    with pytest.raises(ConfigError, match="emulates TP on one device"):
        maybe_spawn(ns(2, 2), "x.py", [], tp=2, emulate=True)  # was: a 30 s hang, then 105 traceback lines
    cfg = open_model(tiny_models["llama"][0]).cfg  # 8 heads
    with pytest.raises(ConfigError, match="valid TP degrees"):
        maybe_spawn(ns(16, 16), "x.py", [], tp=16, model_cfg=cfg)  # was: after 138 s in every process


def test_a_failing_child_reaches_the_parent_as_one_line(tmp_path):

    script = tmp_path / "child.py"
    script.write_text("import sys, time\npid = int(sys.argv[sys.argv.index('--process-id') + 1])\n"
                      "print('some output', file=sys.stderr)\n"
                      "if pid == 1:\n    print('error: boom in the child', file=sys.stderr); sys.exit(2)\n"
                      "time.sleep(30)\n")
    r = subprocess.run([sys.executable, "-c", "import sys; from spd_jax.distributed import launch_local; "
                        f"sys.exit(launch_local([sys.executable, {str(script)!r}], 2))"],
                       capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 2
    errs = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errs) == 1 and "process 1 of 2 failed (exit 2): boom in the child" in errs[0], r.stderr
    assert "Traceback" not in r.stderr


def test_more_one_line_errors(tmp_path, tiny_models):
    from spd_jax.checkpoint import Checkpointer
    from spd_jax.cli import parse_list
    from spd_jax.inference import allreduce_of
    from spd_jax.loading import SafetensorsFile, WeightLoadError
    from spd_jax.tasks import load_bigbench

    table = tmp_path / "t.json"
    table.write_text(json.dumps({"tp": 2, "allreduce": [{"bytes": 0, "in_loop_us_by_method": {"psum": 1.0}}]}))
    run = load_run_config(None, {"tp": 2, "allreduce": "auto", "allreduce_table": str(table)})
    with pytest.raises(ConfigError, match="bad choice-table entry"):
        allreduce_of(run)
    task = tmp_path / "task.json"
    for text, msg in [("[1, 2]", "not a BIG-bench task"),
                      (json.dumps({"examples": [{"input": "q", "target_scores": "[1, 2]"}]}), "example 1 is not a valid"),
                      (json.dumps({"examples": [{"target_scores": {"a": 1}}]}), "example 1 is not a valid")]:
        task.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_bigbench(task)
    st = tmp_path / "m.safetensors"
    for header, msg in [([1], "header is a JSON list"), ({"w": {"dtype": "F32", "shape": [2]}}, "damaged header entry"),
                        ({"w": {"dtype": "F32", "shape": [3, 3], "data_offsets": [0, 8]}}, "does not hold")]:
        h = json.dumps(header).encode()
        st.write_bytes(len(h).to_bytes(8, "little") + h + bytes(8))
        with pytest.raises(WeightLoadError, match=msg):
            SafetensorsFile(st)
    import shutil

    notok = tmp_path / "notok"
    shutil.copytree(tiny_models["llama"][0], notok)  # config and weights, no tokenizer files
    with pytest.raises(WeightLoadError, match="no tokenizer files"):
        open_model(notok).tokenizer()
    (tmp_path / "foreign" / "checkpoint" / "3" / "state").mkdir(parents=True)
    with pytest.raises(ConfigError, match="holds no readable pipeline state"):
        Checkpointer(tmp_path / "foreign" / "checkpoint").restore_state()
    with pytest.raises(ConfigError, match="--ratios: 'half' is not a number"):
        parse_list("0,half", float, "--ratios", 0, 1)
    with pytest.raises(ConfigError, match="give one of them"):  # was: the checkpoint's plan silently won
        load_run_config(None, {"checkpoint": str(tmp_path), "spd_blocks": "none"})
    with pytest.raises(ConfigError, match="give one of them"):
        load_run_config(None, {"spd_plan": str(tmp_path / "p.json"), "spd_blocks": "all"})


_SIGNAL_IN_A_GC_CALLBACK = """
import gc, os, signal, time
from spd_jax.cli import run

signal.signal(signal.SIGINT, signal.default_int_handler)  # a test worker may ignore SIGINT, and a child inherits it

def main():
    def callback(phase, _info):  # the signal lands while a gc callback runs (jax registers one)
        if phase == "start" and not callback.__dict__.get("fired"):
            callback.fired = True
            os.kill(os.getpid(), signal.SIGNUM)
            sum(range(10_000))  # the handler's exception is raised here, and the gc machinery swallows it
    gc.callbacks.append(callback)
    try:
        gc.collect()
        time.sleep(5)
        print("ran to the end")
        return 0
    finally:
        print("cleanup ran")

run(main)
"""


@pytest.mark.parametrize("signum", ["SIGTERM", "SIGINT"])
def test_a_signal_swallowed_by_a_callback_still_ends_the_run_through_its_cleanup(tmp_path, signum):
    script = tmp_path / "job.py"
    script.write_text(_SIGNAL_IN_A_GC_CALLBACK.replace("SIGNUM", signum))
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=ENV, timeout=60)
    # was: exit 0, the run went on to the end
    assert r.returncode == 128 + getattr(signal, signum), (r.returncode, r.stdout, r.stderr)
    assert "cleanup ran" in r.stdout and "ran to the end" not in r.stdout
    assert "Traceback" not in r.stderr, r.stderr


def test_sigterm_before_the_first_checkpoint_leaves_no_folder(tokenized_tiny, tmp_path):
    model, corpus = tokenized_tiny
    out = tmp_path / "run"
    p = subprocess.Popen([sys.executable, str(ROOT / "launch/train_distill.py"), "--model", str(model), "--tp", "2",
                          "--data", str(corpus), "--calib-samples", "64", "--calib-len", "64", "--no-progress",
                          "--out", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
    deadline = time.time() + 120
    while not (out / ".lock").exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert (out / ".lock").exists()
    p.terminate()
    err = p.communicate(timeout=120)[1]
    assert p.returncode != 0 and "Traceback" not in err, err[-2000:]
    assert not out.exists()  # was: out/.lock left behind
