"""Architecture as data: declared parameter layouts, the SyncPlan value, one config system."""

import chex
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from spd_jax.arch import FAMILIES, ParamInfo
from spd_jax.config import ConfigError
from spd_jax.pipeline.config import load_pipeline_config
from spd_jax.plan import SyncPlan, plan_from_modes
from spd_jax.runtime import build_model_def, param_infos
from spd_jax.sharding import spec_of

# ----------------------------------------------------------------------------- parameter layouts


def test_a_parameter_without_a_declared_layout_is_an_error():
    class Bad(nnx.Module):
        def __init__(self):
            self.ok = nnx.Param(jnp.zeros((2, 3)), info=ParamInfo(("embed", "ffn")))
            self.w = nnx.Param(jnp.zeros((2, 3)))  # no layout: must not be silently replicated

    _, state = nnx.split(nnx.eval_shape(Bad))
    with pytest.raises(ValueError, match="w declares no layout"):
        param_infos(state)


def test_an_unknown_logical_axis_is_an_error():
    with pytest.raises(ValueError, match="unknown logical axis"):
        ParamInfo(("embed", "heads"))


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_megatron_partition_specs_come_from_the_declared_axes(tiny_models, arch):
    from spd_jax.loading import open_model

    mdef = build_model_def(open_model(tiny_models[arch][0]).cfg, 4)
    blk = mdef.specs()["layers"][0]
    col, row = P(None, "tp"), P("tp", None)
    up, down = ("fc1", "fc2") if arch == "opt" else ("gate", "down")
    chex.assert_trees_all_equal(
        (blk["attn"]["q"]["w"], blk["attn"]["k"]["w"], blk["attn"]["o"]["w"], blk["mlp"][up]["w"],
         blk["mlp"][down]["w"], blk["attn_norm"]["scale"], mdef.specs()["embed"]["w"]),
        (col, col, row, col, row, P(), row))
    if arch == "opt":  # column biases are split, row-parallel biases replicated (added once after the sync)
        assert (blk["attn"]["q"]["b"], blk["attn"]["o"]["b"], blk["mlp"]["fc2"]["b"]) == (P("tp"), P(), P())
    names = mdef.infos["layers"][2]["attn"]["k"]["w"]
    assert names.hf.endswith("layers.2.self_attn.k_proj.weight") and names.transpose
    assert spec_of(mdef.infos["layers"][2]["attn"]["k"]["w"]) == col


def test_every_family_names_every_role_its_modules_use():
    for arch in FAMILIES:
        from spd_jax.config import ModelConfig, RopeConfig

        fam = FAMILIES[arch]
        cfg = ModelConfig(arch=arch, vocab_size=16, hidden=8, n_layers=2, n_heads=2, n_kv_heads=2, head_dim=4,
                          intermediate=8, max_position=32, rope=None if fam.positions == "learned" else RopeConfig(),
                          qkv_bias=arch == "opt", o_bias=arch == "opt")
        infos = build_model_def(cfg, 2).infos
        import jax

        for info in jax.tree.leaves(infos, is_leaf=lambda x: isinstance(x, ParamInfo)):
            assert info.hf and "{i}" not in info.hf, (arch, info)
            assert (info.gguf is None) == (fam.gguf is None), (arch, info)


@pytest.mark.parametrize("arch,attention_bias,want", [
    # (qkv_bias, o_bias, sliding_window) as transformers' modelling code builds each family's attention
    ("llama", False, (False, False, 64)), ("llama", True, (True, True, 64)),  # a window a GGUF records
    ("mistral", False, (False, False, 64)), ("qwen2", False, (True, False, None)),
    ("qwen3", True, (True, True, None)), ("opt", False, (True, True, None))])
def test_biases_and_windows_come_from_the_family_table(arch, attention_bias, want):
    from types import SimpleNamespace

    from spd_jax.config import model_config_from_hf

    hf = SimpleNamespace(model_type=arch, vocab_size=16, hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=8, ffn_dim=8, max_position_embeddings=32,
                         rms_norm_eps=1e-6, attention_bias=attention_bias, sliding_window=64)
    cfg = model_config_from_hf(hf)
    assert (cfg.qkv_bias, cfg.o_bias, cfg.sliding_window) == want
    if arch in ("qwen2", "qwen3"):  # per-layer windows are refused, not silently ignored
        with pytest.raises(ConfigError, match="use_sliding_window"):
            model_config_from_hf(SimpleNamespace(**vars(hf), use_sliding_window=True))


def test_family_names_live_in_one_table():
    from spd_jax.arch import GGUF_ARCHS
    from spd_jax.config import SUPPORTED_ARCHS, Arch, ModelConfig

    import typing

    assert SUPPORTED_ARCHS == tuple(FAMILIES) == typing.get_args(Arch)
    assert GGUF_ARCHS == {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}  # what llama.cpp writes these as
    with pytest.raises(ConfigError, match="arch must be"):
        from spd_jax.config import check_types

        check_types(ModelConfig(arch="gpt2", vocab_size=1, hidden=1, n_layers=1, n_heads=1, n_kv_heads=1,
                                head_dim=1, intermediate=1, max_position=1), "model config")


# ----------------------------------------------------------------------------- SyncPlan


def test_sync_plan_constructors_agree():
    L = 8
    assert SyncPlan.from_spec("5-7", L) == SyncPlan.from_ratio(L, 0.375) == SyncPlan.from_blocks([5, 6, 7], L)
    assert SyncPlan.from_order([7, 5, 6, 0, 1], 3, L) == SyncPlan.from_blocks([5, 6, 7], L)
    plan_file = plan_from_modes(tuple(i >= 5 for i in range(L)))
    assert SyncPlan.from_plan(plan_file, L) == SyncPlan.from_spec("5-7", L)
    p = SyncPlan.from_spec("1,3", L, bias="none")
    assert (p.spd_blocks, p.n_spd, p.first_spd(), p.block_allreduces, p.bias) == ([1, 3], 2, 1, 14, "none")
    assert SyncPlan.sync(L).first_spd() == L and SyncPlan.floor(L).block_allreduces == 0
    assert hash(SyncPlan.from_spec("all", L)) == hash(SyncPlan.all_spd(L))  # a static jit argument


def test_sync_plan_refuses_bad_values():
    with pytest.raises(ConfigError, match="unknown block mode"):
        SyncPlan(("sync", "drop"))
    with pytest.raises(ConfigError, match="all-or-nothing"):
        SyncPlan(("none", "sync"))
    with pytest.raises(ConfigError, match="bias"):
        SyncPlan(("sync",), bias="half")
    with pytest.raises(ConfigError, match="out of range"):
        SyncPlan.from_blocks([9], 4)
    with pytest.raises(ConfigError, match="ratio"):
        SyncPlan.from_ratio(4, 1.5)
    with pytest.raises(ConfigError, match="3 blocks, the model has 4"):
        SyncPlan.sync(3).check(4)


# ----------------------------------------------------------------------------- one config system


def test_a_typo_in_a_distill_field_fails_at_load_before_any_work(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("tp: 2\ndistill:\n  optimizer: adamx\n")
    with pytest.raises(ConfigError, match="optimizer must be 'adamw' or 'adam' or 'sgd'"):
        load_pipeline_config(str(p), {})
    p.write_text("tp: 2\ndistill:\n  optimiser: adam\n")
    with pytest.raises(ConfigError, match="unknown key"):
        load_pipeline_config(str(p), {})


# ----------------------------------------------------------------------------- import layers

# Each module imports only from its own layer or below (function-level imports included), and no two modules
# import each other, directly or through others.
LAYERS = [
    {"arch", "gguf_file"},
    {"config"},
    {"collectives", "sharding", "kernels", "plan", "data", "embedded", "runlock", "fingerprint", "gguf_meta"},
    {"model"},
    {"runtime", "distributed"},
    {"loading", "checkpoint", "generate", "measure", "evaluation", "tasks"},
    {"pipeline", "inference", "bench", "peer_hf", "serving"},
    {"cli"},
    {"commands"},
]


def _import_graph():
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "spd_jax"
    mods = {}
    for p in root.rglob("*.py"):
        parts = p.relative_to(root.parent).with_suffix("").parts
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {m: set() for m in mods}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(pkg.split(".")[: len(pkg.split(".")) - node.level + 1]) if node.level else ""
                target = ".".join(x for x in (base, node.module) if x)
                names = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            graph[m] |= {n for n in names if n in mods and n not in (m, "spd_jax")}
    return graph


def _layer(module: str) -> int:
    top = module.split(".")[1]
    return next(i for i, layer in enumerate(LAYERS) if top in layer)


def test_the_import_graph_has_no_cycle_and_no_import_up_the_layers():
    graph = _import_graph()
    up = sorted(f"{m} -> {t}" for m, ts in graph.items() if m != "spd_jax" for t in ts if _layer(t) > _layer(m))
    assert not up, f"imports from a lower layer up to a higher one: {up}"
    seen, on_path = set(), []

    def visit(m):  # depth-first search for a back edge
        if m in on_path:
            raise AssertionError(f"import cycle: {' -> '.join(on_path[on_path.index(m):] + [m])}")
        if m in seen:
            return
        on_path.append(m)
        for t in sorted(graph[m]):
            visit(t)
        on_path.pop()
        seen.add(m)

    for m in sorted(graph):
        visit(m)
