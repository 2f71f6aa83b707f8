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
    from spd_jax.pipeline.run import load_pipeline_config

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
