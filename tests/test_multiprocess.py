"""Multi-process TP through jax.distributed on CPU (gloo): 2 processes x 4 devices == 1 process x 8."""

import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env(devices=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    return env


@pytest.mark.parametrize("blocks", ["none", "all"])  # a sync model and an SPD model
def test_two_processes_match_one_process(tiny_models, tmp_path, blocks):
    model = str(tiny_models["llama"][0])
    worker = str(ROOT / "tests/mp_worker.py")
    r = subprocess.run([sys.executable, str(ROOT / "launch/local_cluster.py"), "--num-processes", "2",
                        "--devices-per-process", "4", "--", sys.executable, worker, model, str(tmp_path / "mp.npz"),
                        blocks], env=dict(_env(), SPD_JAX_REPLICATE_CHECK_BYTES="0"),  # inputs placed per shard
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, worker, model, str(tmp_path / "sp.npz"), blocks], env=_env(8),
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    mp, sp = np.load(tmp_path / "mp.npz"), np.load(tmp_path / "sp.npz")
    assert int(mp["processes"]) == 2 and int(sp["processes"]) == 1
    np.testing.assert_allclose(mp["logits"], sp["logits"], atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(mp["tokens"], sp["tokens"])


def test_processes_agree_on_the_measured_allreduce_timings(tmp_path):
    """Each process times its own all-reduces; a choice table made from differing timings would compile
    different collectives in different processes (a hang). Two processes whose own timings pick different
    methods end with process 0's timings and the same table."""
    r = subprocess.run([sys.executable, str(ROOT / "launch/local_cluster.py"), "--num-processes", "2",
                        "--devices-per-process", "1", "--", sys.executable, str(ROOT / "tests/mp_agree_worker.py"),
                        str(tmp_path / "agree")], env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    import json

    res = [json.loads((tmp_path / f"agree.{i}.json").read_text()) for i in (0, 1)]
    assert res[0]["own"][0]["fastest"] == "a2a" and res[1]["own"][0]["fastest"] == "gather"  # they disagreed
    assert res[0]["table"] == res[1]["table"] == [[8192, "a2a"]]
    assert res[1]["rows"] == res[0]["rows"] == res[0]["own"]  # process 0's numbers (exact in float32) everywhere


def test_unreachable_coordinator_fails_clearly_and_quickly(tiny_models):
    t0 = time.time()
    r = subprocess.run([sys.executable, str(ROOT / "launch/infer.py"), "--model", str(tiny_models["llama"][0]),
                        "--tp", "2", "--coordinator", "127.0.0.1:9", "--num-processes", "2", "--process-id", "1",
                        "--init-timeout", "5"], env=_env(4), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "could not join the jax.distributed cluster at 127.0.0.1:9" in r.stderr
    assert "Traceback" not in r.stderr
    assert time.time() - t0 < 120


def test_spd_pipeline_across_two_processes(tokenized_tiny, tmp_path):
    """Two processes (one device each) run the pipeline with the teacher states memory-mapped from one file
    per host (written by process 0, read by both)."""
    model, corpus = tokenized_tiny
    out = tmp_path / "run"
    r = subprocess.run([sys.executable, str(ROOT / "launch/local_cluster.py"), "--num-processes", "2",
                        "--devices-per-process", "1", "--", sys.executable, str(ROOT / "launch/train_distill.py"),
                        "--model", str(model), "--tp", "2", "--no-emulate", "--data", str(corpus),
                        "--calib-samples", "4", "--calib-len", "32", "--eval-tokens", "128", "--ratio", "1.0",
                        "--tau1=-1e9", "--tau2=1e9", "--epochs", "2", "--lr", "1e-5", "--distill-batch-size", "2",
                        "--save-every", "2", "--teacher-states", "disk", "--no-progress", "--out", str(out)],
                       env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("done in") == 1  # only process 0 reports
    report = __import__("json").loads((out / "report.json").read_text())
    assert report["plan"]["tp"] == 2 and all(v["status"] == "ok" for v in report["distillation"].values())
    assert not (out / "teacher_states").exists()  # the run's cache is removed at the end
    assert set(report["memory_gib"]) >= {"hidden_states", "sensitivity", "distill"}
    assert report["memory_gib"]["distill"]["host_peak_gib"] > 0
    from spd_jax.checkpoint import load_checkpoint_params
    from spd_jax.loading import open_model
    from spd_jax.runtime import Engine, build_model_def

    lm = open_model(model)
    params, state = load_checkpoint_params(out / "checkpoint", Engine.create(build_model_def(lm.cfg, 2)))
    assert state["stage"] == "done"


def test_spawn_one_process_per_device_gives_the_same_tokens_and_one_output(tokenized_tiny):
    """`--spawn N` (one process per GPU on a GPU host; here one per simulated CPU device) == one process."""
    model = str(tokenized_tiny[0])
    args = [str(ROOT / "launch/infer.py"), "--model", model, "--tp", "2", "--spd-blocks", "0", "--max-new-tokens",
            "6", "--no-warmup", "--json", "--prompt", "The capital of France is"]
    env = dict(_env(), PYTHONUNBUFFERED="1")
    spawned = subprocess.run([sys.executable, *args, "--spawn", "2"], env=env, capture_output=True, text=True,
                             timeout=600)
    assert spawned.returncode == 0, spawned.stderr[-3000:]
    single = subprocess.run([sys.executable, *args], env=_env(8), capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = __import__("json").loads(spawned.stdout), __import__("json").loads(single.stdout)  # one JSON each
    assert a["n_devices"] == 2 and b["n_devices"] == 8
    assert a["results"][0]["token_ids"] == b["results"][0]["token_ids"]
    for noise in ("Traceback", "UNAVAILABLE", "Connection reset", "Failed to disconnect"):
        assert noise not in spawned.stderr, spawned.stderr[-3000:]


def test_spawn_refuses_bad_combinations(tokenized_tiny):
    base = [sys.executable, str(ROOT / "launch/infer.py"), "--model", str(tokenized_tiny[0]), "--tp", "2"]
    r = subprocess.run(base + ["--spawn", "3"], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "TP degree must be a multiple of 3" in r.stderr
    r = subprocess.run(base + ["--spawn", "2", "--process-id", "0"], env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "do not combine it" in r.stderr


def test_launcher_drops_only_the_coordinator_exit_warning():
    """Process 0's stderr goes through the launcher, which drops the coordination service's exit warning
    block (seen on GPUs after every successful run) and passes everything else, progress bars included."""
    import io

    from spd_jax.distributed import filter_exit_noise

    text = (b"loading 10%\rloading 100%\rdone\n"
            b"W1127 20:11:03.639681    1037 pjrt_client.cc:1605] WatchTasksAsync failed for task 0: UNAVAILABLE\n"
            b"Additional GRPC error information from remote target coordination_service while calling WatchTasks:\n"
            b":UNAVAILABLE:failed to connect to all addresses\n=== Source Location Trace: === \n"
            b"external/xla+/xla/tsl/distributed_runtime/rpc/grpc_util.h:89\n"
            b"error: a real message\nlast line without newline")

    class Chunked(io.BytesIO):  # a pipe delivers arbitrary chunks
        def read1(self, n=-1):
            return super().read(5)

    out = io.BytesIO()
    filter_exit_noise(Chunked(text), out)
    assert out.getvalue() == b"loading 10%\rloading 100%\rdone\nerror: a real message\nlast line without newline"
