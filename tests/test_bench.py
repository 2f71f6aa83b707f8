"""The latency benchmark on tiny shapes (8 simulated CPU devices): fields, block counts, floor HLO."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spd_jax.bench import memory_fraction, param_count, random_params, set_interconnect, shape_config
from spd_jax.plan import SyncPlan
from spd_jax.runtime import Engine, build_model_def

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("n_layers", [4, 30, 32, 80])
@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.7, 0.75, 1.0])
def test_ratio_drops_exactly_round_r_times_l_blocks(n_layers, ratio):
    plan = SyncPlan.from_ratio(n_layers, ratio)
    assert plan.n_spd == int(round(ratio * n_layers))
    assert plan.spd_blocks == list(range(n_layers - plan.n_spd, n_layers))  # the last blocks
    assert plan.block_allreduces == 2 * n_layers - plan.n_spd


@pytest.mark.parametrize("shape,published", [
    ("llama2-7b", 6_738_415_616), ("llama2-13b", 13_015_864_320), ("llama2-70b", 68_976_648_192),
    ("opt-6.7b", 6_658_473_984), ("opt-30b", 29_974_540_288),
])
def test_param_count_equals_the_published_checkpoint_sizes(shape, published):
    """Counted from the parameters' declared layouts (no padding or kv replication), abstract shapes only;
    references: the sizes transformers reports for meta-llama/Llama-2-*-hf and facebook/opt-*."""
    assert param_count(shape) == published


def test_param_count_does_not_start_the_backend():
    code = ("from spd_jax.bench import param_count; param_count('llama2-7b'); "
            "from jax._src import xla_bridge; assert not xla_bridge.backends_are_initialized()")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_param_count_pads_nothing_at_tp_that_needs_padding():
    """At TP 8 the tiny OPT's ffn/vocab are padded and LLaMA's kv heads replicated: the count is unchanged."""
    for shape in ("tiny", "tiny-opt"):
        a = build_model_def(shape_config(shape), 1).param_count()
        b = build_model_def(shape_config(shape), 8).param_count()
        big = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(build_model_def(shape_config(shape), 8).abstract))
        assert a == b and big >= b


@pytest.mark.parametrize("shape,tp,card_gib,expect", [
    ("llama2-70b", 2, 79.2, 0.92),   # 64 GiB of weights on an 80 GB H100: weights + 8 GiB
    ("llama2-70b", 2, 70.0, 0.95),   # a smaller card: capped at 95%
    ("llama2-70b", 2, 139.8, None),  # the same on H200: JAX's default 75% holds it
    ("llama2-13b", 4, 139.8, None),  # the configuration that ran out of collective memory at 95%
    ("llama2-70b", 4, 79.2, None),
    ("llama2-70b", 2, None, 0.95),   # no nvidia-smi: 40 GiB threshold
    ("llama2-7b", 1, None, None),
])
def test_memory_fraction_only_where_the_weights_need_it(shape, tp, card_gib, expect):
    assert memory_fraction(param_count(shape) * 2 / tp / 2**30, card_gib) == expect


def test_interconnect_modes_set_exactly_their_documented_nccl_variables(monkeypatch):
    """pcie keeps NCCL's shared-memory path (only P2P off) even where the environment had turned it off;
    net turns both off and forces NCCL's socket transport on loopback; nvlink leaves the environment as it
    is; hbw/lbw are aliases of nvlink/net. NVLink multicast (NCCL_NVLS_ENABLE) is never touched."""
    keys = ("NCCL_P2P_DISABLE", "NCCL_SHM_DISABLE", "NCCL_NET", "NCCL_SOCKET_IFNAME")
    for k in keys:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    monkeypatch.setenv("NCCL_SHM_DISABLE", "1")
    set_interconnect("nvlink")
    assert [os.environ.get(k) for k in keys] == [None, "1", None, None]
    set_interconnect("pcie")
    assert [os.environ.get(k) for k in keys] == ["1", None, None, None]
    for name in ("net", "lbw"):
        set_interconnect(name)
        assert [os.environ.get(k) for k in keys] == ["1", "1", "Socket", "lo"]
    for k in keys:  # nvlink (alias hbw) sets nothing: a fresh environment stays as it is
        monkeypatch.delenv(k, raising=False)
    set_interconnect("hbw")
    assert [os.environ.get(k) for k in keys] == [None, None, None, None]
    assert os.environ["NCCL_NVLS_ENABLE"] == "0"
    with pytest.raises(ValueError, match="unknown interconnect"):
        set_interconnect("nvlink5")


def test_link_check_says_whether_a_mode_slowed_small_allreduces():
    from spd_jax.bench import link_check

    ar = lambda us: [{"bytes": 8192, "in_loop_us": us}, {"bytes": 1 << 20, "in_loop_us": 10 * us}]  # noqa: E731
    assert link_check("nvlink", ar(28.0), None)["status"] == "reference"
    ok = link_check("net", ar(118.0), {"allreduce": ar(28.0)})
    assert ok["status"] == "verified" and ok["slower_x"] == pytest.approx(118 / 28) and "verified" in ok["message"]
    same = link_check("pcie", ar(29.0), {"allreduce": ar(28.0)})
    assert same["status"] == "not slower" and "do not show that link" in same["message"]
    assert link_check("net", ar(118.0), None)["status"] == "unverified"


def _hlo(engine, plan):
    params = random_params(engine)
    fwd = engine.forward(plan)
    tokens = engine.replicate(np.zeros((1, 8), np.int32))
    pad = engine.replicate(np.zeros((1,), np.int32))
    return jax.jit(lambda p, t, d: fwd(p, t, d, None, jnp.int32(0))[0]).lower(params, tokens, pad).as_text()


@pytest.mark.parametrize("shape", ["tiny", "tiny-opt"])
def test_floor_mode_has_no_all_reduce_and_spd_has_fewer(shape):
    cfg = shape_config(shape)
    eng = Engine.create(build_model_def(cfg, 4, "float32"))
    L = cfg.n_layers
    count = lambda text: text.count("all-reduce") + text.count("all_reduce")  # noqa: E731
    sync = count(_hlo(eng, SyncPlan.sync(L)))
    spd = count(_hlo(eng, SyncPlan.all_spd(L)))
    floor = count(_hlo(eng, SyncPlan.floor(L)))
    assert sync == 2 * L + 1  # two per block + the vocab-parallel embedding
    assert spd == L + 1  # one per block
    assert floor == 0


def test_bench_runs_end_to_end_and_reports_measured_numbers(tmp_path):
    out = tmp_path / "b.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "launch/bench.py"), "--shape", "tiny", "--tp", "8",
                        "--prompt-len", "16", "--new-tokens", "6", "--repeats", "2", "--spd-ratios", "0,0.5,1",
                        "--floor", "--dtype", "float32", "--allreduce-sizes", "8192,65536,1048576",
                        "--bandwidth-mib", "4", "--json", str(out), "--plot", str(tmp_path / "b.png")],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    # unsaid layouts are the shipped decode path: fused + folded (tiny is RMSNorm), attention resolved for CPU
    assert (d["fused_projections"], d["fold_norms"], d["attention_kernel"]) == (True, True, "xla")
    for k in ("shape", "tp", "batch", "prompt_len", "new_tokens", "dtype", "interconnect", "device", "n_devices",
              "jax", "weight_bytes_per_device", "allreduce", "rows", "random_weights", "compile_s"):
        assert k in d, k
    assert [row["label"] for row in d["rows"]] == ["r=0.00", "r=0.50", "r=1.00", "floor"]
    assert [row["n_spd"] for row in d["rows"]] == [0, 2, 4, 0]
    # a result says where it came from: date, the checkout's commit, the command
    prov = d["provenance"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", prov["date"]), prov
    assert prov["commit"] is None or re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", prov["commit"]), prov
    assert "--json" in prov["command"], prov
    sync = d["rows"][0]
    for row in d["rows"]:
        for k in ("ttft_ms", "tpot_ms", "e2e_ms", "tokens_per_s", "speedup_e2e_vs_sync", "speedup_tpot_vs_sync"):
            assert np.isfinite(row[k]) and row[k] > 0, (row["label"], k)
        # the reported numbers are the measured ones: medians of the raw samples, ratios of medians
        assert row["e2e_ms"] == pytest.approx(float(np.median(row["e2e_all"])))
        assert row["ttft_ms"] == pytest.approx(float(np.median(row["ttft_all"])))
        assert row["speedup_e2e_vs_sync"] == pytest.approx(sync["e2e_ms"] / row["e2e_ms"])
        assert len(row["e2e_all"]) == 2 and len(set(row["e2e_all"])) == 2  # two distinct measurements
    assert len(d["allreduce"]) == 3 and all(a["median_us"] > 0 for a in d["allreduce"])
    # the in-loop figure is a difference of two measured loop times (64 vs 1 dependent all-reduces)
    assert all(a["in_loop_us"] > 0 and np.isfinite(a["bus_GBps"]) for a in d["allreduce"])
    assert (tmp_path / "b.png").stat().st_size > 0
    # the decode budget is computed from the measured bandwidth and the measured rows, nothing else
    hbm, bud = d["hbm"], d["decode_budget"]
    assert hbm["read_GBps"] > 0 and hbm["t_many_ms"] > 0
    bytes_ms = d["weight_bytes_per_device"] / (hbm["read_GBps"] * 1e9) * 1e3
    assert bud["bytes_ms"] == pytest.approx(bytes_ms)
    floor = d["rows"][-1]["tpot_ms"]
    assert bud["overhead_per_block_us"] == pytest.approx((floor - bytes_ms) * 1e3 / 4)
    assert bud["x_bytes"]["sync"] == pytest.approx(sync["tpot_ms"] / bytes_ms)
    assert "per-block overhead" in r.stdout
    # where the wall time went: one phase per step, each a measured non-negative duration, shown as progress
    ph = d["phases_s"]
    assert list(ph)[:4] == ["start-up (imports, devices)", "HBM read bandwidth", "random weights in their shards",
                            "compile 4 configurations"]
    assert [k for k in ph if k.startswith("time ")] == [f"time {row['label']}" for row in d["rows"]]
    assert all(v >= 0 for v in ph.values()) and ph["compile 4 configurations"] > 0
    assert "] time floor (" in r.stderr
    # scripts/bench_table.py (the docs' tables) prints these measured numbers, one row per configuration
    t = subprocess.run([sys.executable, str(ROOT / "scripts/bench_table.py"), str(out)], capture_output=True,
                       text=True, timeout=60)
    assert t.returncode == 0, t.stderr
    table = [line for line in t.stdout.splitlines()  # the latency rows (the all-reduce table has 7 columns)
             if line.startswith("| tiny | 8 | NVLINK (1 proc) |") and line.count("|") == 12]
    assert len(table) == len(d["rows"])
    sync_e2e = d["rows"][0]["e2e_ms"]
    for line, row in zip(table, d["rows"]):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert float(cells[5]) == pytest.approx(row["tpot_ms"], abs=5e-4)
        assert float(cells[6]) == pytest.approx(row["e2e_ms"], abs=0.05)
        if row["n_spd"]:  # e2e cut against the sync row, from the measured e2e times
            assert float(cells[8].rstrip("%")) == pytest.approx(100 * (1 - row["e2e_ms"] / sync_e2e), abs=0.06)


def test_transformers_tp_peer_runs_sharded_and_bench_reports_ratios_to_it(tmp_path):
    """The peer (transformers tp_plan="auto" under torchrun, gloo on CPU) on the tiny shape: it really
    shards the model, and launch/bench.py's peer ratios are computed from the two measured files."""
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    ck, peer = tmp_path / "ck", tmp_path / "peer.json"
    r = subprocess.run([sys.executable, str(ROOT / "launch/bench_peer.py"), "--make-checkpoint", str(ck),
                        "--shape", "tiny"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                        str(ROOT / "launch/bench_peer.py"), "--checkpoint", str(ck), "--prompt-len", "8",
                        "--new-tokens", "4", "--repeats", "2", "--json", str(peer)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    p = json.loads(peer.read_text())
    assert p["tp"] == 2 and p["q_proj_local_shape"] == [64, 128]  # 8 heads x 16 split over 2 processes
    assert p["tpot_ms"] == pytest.approx((p["e2e_ms"] - p["ttft_ms"]) / 3)
    assert p["e2e_ms"] == pytest.approx(float(np.median(p["e2e_all"]))) and len(set(p["e2e_all"])) == 2
    out = tmp_path / "b.json"
    cache = tmp_path / "xla-cache"
    r = subprocess.run([sys.executable, str(ROOT / "launch/bench.py"), "--shape", "tiny", "--tp", "2",
                        "--prompt-len", "8", "--new-tokens", "4", "--repeats", "2", "--spd-ratios", "0,1",
                        "--dtype", "float32", "--peer-json", str(peer), "--json", str(out),
                        "--compile-cache", str(cache), "--fused-projections", "--fold-norms"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert d["fused_projections"] is True and d["fold_norms"] is True
    assert p["config"] == "eager, dynamic cache"
    for row in d["rows"]:
        ratios = row["vs_peers"]["TP 2 eager, dynamic cache"]
        assert ratios["tpot_x"] == pytest.approx(p["tpot_ms"] / row["tpot_ms"])
        assert ratios["e2e_x"] == pytest.approx(p["e2e_ms"] / row["e2e_ms"])
    assert "vs that peer" in r.stdout
    # the static-cache configuration runs and is labelled (torch.compile itself engages on GPUs only)
    pc = tmp_path / "peer-compiled.json"
    r = subprocess.run([sys.executable, str(ROOT / "launch/bench_peer.py"), "--checkpoint", str(ck), "--compiled",
                        "--prompt-len", "8", "--new-tokens", "4", "--repeats", "2", "--json", str(pc)],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(pc.read_text())["config"] == "static cache + torch.compile"
    assert len(list(cache.iterdir())) >= 4  # prefill + decode for two SPD configurations were cached


def _campaign(tmp_path, secs, *jobs, **env_extra):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **env_extra)
    out = tmp_path / "out"
    r = subprocess.run(["bash", str(ROOT / "scripts/gpu_campaign.sh"), str(out), str(secs), *jobs], cwd=ROOT,
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    with tarfile.open(out / "results.tgz") as tar:
        files = {Path(m.name).name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.isfile()}
    return r, files


def test_campaign_script_runs_each_interconnect_and_tabulates_the_measured_rows(tmp_path):
    """scripts/gpu_campaign.sh -> gpu_bench_peer.sh -> launch/bench.py --spawn on CPU: one process per device,
    one JSON per interconnect, BENCH_ARGS reach the benchmark, every step's wall time is logged, the table
    holds the JSON's numbers, and a mode that did not slow the small all-reduces (NCCL variables mean
    nothing to CPU collectives) is checked against the nvlink run of the same call and labelled by the
    outcome (timings of CPU collectives are noisy, so either outcome can occur; the rule is tested above)."""
    _, files = _campaign(tmp_path, 600, "tiny:2:0,1:nvlink+net:0",
                         BENCH_ARGS="--prompt-len 16 --new-tokens 4 --repeats 2 --allreduce-sizes 8192 "
                                    "--dtype float32")
    for ic in ("nvlink", "net"):
        assert f"tiny-tp2-{ic}-1proc.json" in files, files.get("campaign.log", "")[-4000:]
        d = json.loads(files[f"tiny-tp2-{ic}-1proc.json"])
        lc = d["link_check"]
        label = {"reference": "NVLINK (1 proc/device)", "not slower": "NET (1 proc/device, NOT slower than nvlink)",
                 "verified": f"NET (1 proc/device, verified {lc.get('slower_x', 0):.1f}x)"}[lc["status"]]
        assert (d["interconnect"], d["tp"], d["prompt_len"], d["new_tokens"]) == (ic, 2, 16, 4)
        assert (d["n_processes"], d["n_devices"]) == (2, 2)
        assert [row["label"] for row in d["rows"]] == ["r=0.00", "r=1.00", "floor"]
        assert [a["bytes"] for a in d["allreduce"]] == [8192]
        assert lc["status"] == "reference" if ic == "nvlink" else lc["reference_us"] > 0
        lines = [ln for ln in files["table.md"].splitlines()
                 if ln.startswith(f"| tiny | 2 | {label} |") and ln.count("|") == 12]
        assert len(lines) == len(d["rows"])
        for line, row in zip(lines, d["rows"]):
            assert float(line.strip("|").split("|")[5]) == pytest.approx(row["tpot_ms"], abs=5e-4)
    log = files["campaign.log"]
    assert log.count("s (rc 0): python launch/bench.py") == 2
    assert "[bench +" in log and "!!" not in log


def test_campaign_script_skips_a_job_that_cannot_fit_its_deadline(tmp_path):
    r, files = _campaign(tmp_path, 30, "tiny:2:0,1:nvlink:0", GPU0="1")
    assert "!! skipped (deadline): tiny:2:0,1:nvlink:0" in files["campaign.log"]
    assert not [f for f in files if f.endswith(".json")]
    assert "no benchmark results to tabulate" in r.stderr


def test_decode_budget_by_hand():
    from spd_jax.bench import decode_budget

    # LLaMA-2-7B at TP 4: 3.37 GB of weights per GPU over 4 300 GB/s = 0.7837 ms; a 2.0 ms floor over 32
    # blocks leaves (2.0 - 0.7837) / 32 = 38.0 us per block; sync 3.0 ms = 3.83x the weight stream.
    b = decode_budget(3.37e9, 4300.0, 32, {"sync": 3.0, "floor": 2.0})
    assert b["bytes_ms"] == pytest.approx(0.78372, rel=1e-4)
    assert b["overhead_per_block_us"] == pytest.approx(38.009, rel=1e-3)
    assert b["x_bytes"]["sync"] == pytest.approx(3.828, rel=1e-3)
    assert b["allreduce_ms"] == pytest.approx(1.0)
    assert "overhead_per_block_us" not in decode_budget(3.37e9, 4300.0, 32, {"sync": 3.0})


def test_bench_auto_allreduce_measures_its_table_first_and_runs_with_it(tmp_path):
    out = tmp_path / "auto.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT), NCCL_PROTO="LL")  # recorded, not used on CPU
    r = subprocess.run([sys.executable, str(ROOT / "launch/bench.py"), "--shape", "tiny", "--tp", "4",
                        "--prompt-len", "8", "--new-tokens", "4", "--repeats", "1", "--spd-ratios", "0,1",
                        "--dtype", "float32", "--allreduce-methods", "psum,auto", "--allreduce-sizes", "8192,65536",
                        "--bandwidth-mib", "0", "--json", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    d = json.loads(out.read_text())
    assert [row["label"] for row in d["rows"]] == ["r=0.00", "r=1.00", "r=0.00/auto", "r=1.00/auto"]
    # the table is the per-size fastest of this run's own measurement, taken before compiling (psum is kept
    # unless another method was at least 10% faster)
    def pick(by):
        best = min(by, key=by.get)
        return best if by[best] <= 0.9 * by["psum"] else "psum"

    expect = [[a["bytes"], pick(a["in_loop_us_by_method"])] for a in d["allreduce"]]
    # measured at the asked sizes and at this run's own messages: decode 1 x 128 x 4 B, prefill 16 x 128 x 4 B
    assert [a["bytes"] for a in d["allreduce"]] == [1 * 128 * 4, 8192, 65536]
    assert d["allreduce_table"] == expect and {m for m in d["allreduce"][0]["in_loop_us_by_method"]} == {
        "psum", "gather", "a2a"}
    phases = list(d["phases_s"])
    assert phases.index("all-reduce microbenchmark (for auto)") < phases.index("compile 4 configurations")
    assert "auto all-reduce choice table (measured above;" in r.stdout
    assert d["nccl_tuning"].get("NCCL_PROTO") == "LL"  # NCCL settings beyond the link mode are in the result
    for row in d["rows"]:
        assert np.isfinite(row["tpot_ms"]) and row["tpot_ms"] > 0
