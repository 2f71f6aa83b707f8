"""Bad input gets a clear error; YAML configs validate into typed dataclasses; plans round-trip."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from spd_jax.config import ConfigError, load_run_config, parse_block_spec
from spd_jax.loading import WeightLoadError, load_params, open_model
from spd_jax.plan import load_plan, modes_from_plan, plan_from_modes, save_plan
from spd_jax.runtime import Engine, build_model_def
from spd_jax.sharding import TPLayout

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def llama_copy(tiny_models, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(tiny_models["llama"][0], d)
    return d


def _load(d, tp=1):
    lm = open_model(d)
    eng = Engine.create(build_model_def(lm.cfg, tp))
    return load_params(eng, lm.source)


def test_tp_not_dividing_heads_names_valid_degrees(tiny_models):
    cfg = open_model(tiny_models["llama"][0]).cfg  # 8 heads, 4 kv heads
    with pytest.raises(ConfigError, match=r"TP degree 3 .* valid TP degrees: \[1, 2, 4, 8\]"):
        TPLayout(cfg, 3)


def test_too_few_devices_is_clear(tiny_models):
    cfg = open_model(tiny_models["llama"][0]).cfg
    import jax

    with pytest.raises(ConfigError, match="tp=8 needs 8 devices but only 4 are visible"):
        Engine.create(build_model_def(cfg, 8), devices=jax.devices()[:4])


def test_missing_weight_file(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(WeightLoadError, match="no \\*.safetensors weight files"):
        open_model(llama_copy)


def test_missing_shard_listed_in_index(llama_copy):
    (llama_copy / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {"model.norm.weight": "model-00002-of-00002.safetensors"}}))
    with pytest.raises(WeightLoadError, match="missing"):
        open_model(llama_copy)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(llama_copy, damage):
    f = llama_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(WeightLoadError, match="truncated|not a valid safetensors"):
        open_model(llama_copy)


def test_unknown_architecture(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="unknown architecture 'gpt2'"):
        open_model(llama_copy)


def test_shape_mismatch(llama_copy):
    cfg = json.loads((llama_copy / "config.json").read_text())
    cfg["intermediate_size"] = 128  # checkpoint has 120
    (llama_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(WeightLoadError, match=r"shape mismatch for 'model.layers.0.mlp.(down|gate|up)_proj.weight'.*120.*128"):
        _load(llama_copy)


def test_missing_tensor(llama_copy):
    from safetensors.numpy import load_file, save_file

    t = load_file(str(llama_copy / "model.safetensors"))
    del t["model.layers.1.self_attn.v_proj.weight"]
    save_file(t, str(llama_copy / "model.safetensors"))
    with pytest.raises(WeightLoadError, match="no tensor 'model.layers.1.self_attn.v_proj.weight'"):
        _load(llama_copy)


def test_corrupt_gguf(tmp_path):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\x00" * 10)
    with pytest.raises(WeightLoadError, match="broken.gguf"):
        open_model(f)


def test_missing_model_path():
    with pytest.raises(ConfigError, match="model path not found"):
        open_model("/nonexistent/model")


def test_block_spec_parsing():
    assert parse_block_spec("all", 3) == (True, True, True)
    assert parse_block_spec("none", 3) == (False, False, False)
    assert parse_block_spec("0,2-3", 5) == (True, False, True, True, False)
    with pytest.raises(ConfigError, match=r"out of range.*0\.\.4"):
        parse_block_spec("1,7", 5)
    with pytest.raises(ConfigError, match="bad block spec"):
        parse_block_spec("x", 5)


def test_yaml_config_validation_and_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: embedded\ntp: 3\nspd_blocks: '0-4'\ngeneration:\n  max_new_tokens: 7\n  top_p: 0.9\n")
    cfg = load_run_config(f, {"tp": 9, "generation.seed": 4, "dtype": None})
    assert (cfg.tp, cfg.spd_blocks, cfg.generation.max_new_tokens, cfg.generation.top_p, cfg.generation.seed) == \
        (9, "0-4", 7, 0.9, 4)
    f.write_text("tp: 3\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['bogus'\]"):
        load_run_config(f)
    f.write_text("generation:\n  top_p: 1.5\n")
    with pytest.raises(ConfigError, match="top_p must be in"):
        load_run_config(f)
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "nope.yaml")


def test_shipped_configs_load():
    from spd_jax.pipeline.config import load_pipeline_config

    files = sorted((ROOT / "configs").glob("*.yaml"))
    assert len(files) >= 8
    for f in files:
        if f.name.startswith("spd_"):  # SPD pipeline configs
            pc = load_pipeline_config(str(f), {})
            assert pc.tp in (3, 4, 8)
        else:  # run (inference) configs
            load_run_config(f)


def test_plan_roundtrip_and_mismatch(tmp_path):
    p = tmp_path / "plan.json"
    save_plan(plan_from_modes((True, False, True), tp=2), p)
    assert modes_from_plan(load_plan(p), 3) == (True, False, True)
    with pytest.raises(ConfigError, match="model with 3 blocks, this model has 4"):
        modes_from_plan(load_plan(p), 4)


def test_cli_reports_bad_tp_without_traceback(tiny_models):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, str(ROOT / "launch/infer.py"), "--model", str(tiny_models["llama"][0]),
                        "--tp", "3", "--prompt", "hi"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2
    assert "error: TP degree 3" in r.stderr and "valid TP degrees: [1, 2, 4, 8]" in r.stderr
    assert "Traceback" not in r.stderr


def _bench_json(path, tp, by_method=True):
    rows = [{"bytes": 8192, "in_loop_us": 120.0}, {"bytes": 1 << 20, "in_loop_us": 980.0}]
    if by_method:
        rows[0]["in_loop_us_by_method"] = {"psum": 120.0, "gather": 125.0, "a2a": 84.0}
        rows[1]["in_loop_us_by_method"] = {"psum": 980.0, "gather": 1200.0, "a2a": 1500.0}
    path.write_text(json.dumps({"tp": tp, "interconnect": "net", "allreduce": rows}))
    return path


def test_allreduce_auto_needs_a_measured_table_of_this_tp(tmp_path):
    from spd_jax.inference import allreduce_of

    with pytest.raises(ConfigError, match="auto needs allreduce_table"):
        load_run_config(None, {"allreduce": "auto"})
    with pytest.raises(ConfigError, match="only read with allreduce: auto"):
        load_run_config(None, {"allreduce_table": "t.json"})
    for bad in ({"tp": 1}, {"tp": 2, "emulate": True}):  # nothing real to time
        with pytest.raises(ConfigError, match="measure times the all-reduces of this run's devices"):
            load_run_config(None, {"allreduce": "auto", "allreduce_table": "measure", **bad})
    run = lambda path, tp=4: load_run_config(None, {"allreduce": "auto", "allreduce_table": str(path), "tp": tp})  # noqa: E731
    with pytest.raises(ConfigError, match="not found"):
        allreduce_of(run(tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a usable launch/bench.py result"):
        allreduce_of(run(tmp_path / "bad.json"))
    with pytest.raises(ConfigError, match="no all-reduce timings by method"):
        allreduce_of(run(_bench_json(tmp_path / "psum_only.json", 4, by_method=False)))
    with pytest.raises(ConfigError, match="measured at TP 2, this run is TP 4"):
        allreduce_of(run(_bench_json(tmp_path / "tp2.json", 2)))
    how = allreduce_of(run(_bench_json(tmp_path / "tp4.json", 4)))
    assert how.method == "auto" and how.table == ((8192, "a2a"), (1 << 20, "psum"))


def test_infer_with_auto_allreduce_gives_the_psum_tokens_and_a_clear_error_without_a_table(tokenized_tiny, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, str(ROOT / "launch/infer.py"), "--model", str(tokenized_tiny[0]), "--tp", "2",
            "--prompt", "hello there", "--max-new-tokens", "5", "--temperature", "0", "--json"]
    r = subprocess.run(base + ["--allreduce", "auto", "--allreduce-table", str(tmp_path / "none.json")],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 2 and "error: allreduce_table" in r.stderr and "Traceback" not in r.stderr
    table = _bench_json(tmp_path / "tp2.json", 2)
    outs = [subprocess.run(base + extra, capture_output=True, text=True, env=env, timeout=300)
            for extra in (["--allreduce", "auto", "--allreduce-table", str(table)], ["--allreduce", "psum"],
                          ["--allreduce", "auto", "--allreduce-table", "measure"])]
    assert all(o.returncode == 0 for o in outs), "".join(o.stderr[-2000:] for o in outs)
    auto, psum, measured = (json.loads(o.stdout) for o in outs)
    assert auto["allreduce"] == {"method": "auto", "max_bytes": 256 << 10, "table": [[8192, "a2a"], [1 << 20, "psum"]]}
    assert psum["allreduce"]["method"] == "psum"
    tokens = [r["token_ids"] for r in auto["results"]]
    assert tokens == [r["token_ids"] for r in psum["results"]] == [r["token_ids"] for r in measured["results"]]
    assert len(tokens[0]) == 5
    # measured at start-up: one entry per size of 1/8/32/128/2048 tokens' hidden states, each a real method
    from transformers import AutoConfig

    hidden = AutoConfig.from_pretrained(tokenized_tiny[0]).hidden_size
    t = measured["allreduce"]["table"]
    assert [b for b, _ in t] == [n * hidden * 4 for n in (1, 8, 32, 128, 2048)]  # float32 (the default dtype)
    assert {m for _, m in t} <= {"psum", "gather", "a2a"} and measured["allreduce"]["method"] == "auto"
