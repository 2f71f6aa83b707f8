"""SPD pipeline: sensitivity, classification, B2B, head grouping, checkpoints, resume after a kill."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from spd_jax.checkpoint import Checkpointer, load_checkpoint_params
from spd_jax.config import ConfigError
from spd_jax.data import DataSpec, calibration_tokens
from spd_jax.loading import load_params, open_model
from spd_jax.pipeline.analysis import classify, select_by_budget, select_by_ratio, sensitivity, thresholds
from spd_jax.pipeline.distill import BlockDistiller, DistillConfig
from spd_jax.pipeline.grouping import head_group_block, match, permute_block, scatter
from spd_jax.pipeline.ops import ModelOps
from spd_jax.pipeline.config import load_pipeline_config
from spd_jax.plan import SyncPlan
from spd_jax.runtime import Engine, build_model_def

ROOT = Path(__file__).resolve().parents[1]


def _setup(path, tp, emulate=False):
    lm = open_model(path)
    eng = Engine.create(build_model_def(lm.cfg, tp), emulate=emulate)
    return lm, eng, load_params(eng, lm.source)


def _llama_sensitivity(tiny_models, tp):
    lm, eng, params = _setup(tiny_models["llama"][0], tp)
    ops = ModelOps(eng, batch_size=4)
    tokens = np.random.RandomState(0).randint(3, 100, size=(4, 16)).astype(np.int32)
    h = ops.hidden_states(params, tokens)
    return eng, params, tokens, sensitivity(ops, params, h, tokens, progress=False)


def test_sensitivity_of_tp1_model_is_zero(tiny_models):
    eng, params, tokens, sens = _llama_sensitivity(tiny_models, 1)
    assert sens.base_ppl > 1
    np.testing.assert_allclose(sens.s, 0.0, atol=1e-3 * sens.base_ppl)


def test_sensitivity_compiles_one_program_per_block_mode(tiny_models):
    """Every suffix perplexity reuses one compiled program per block mode (+ one for the LM head), however many
    blocks and suffixes the analysis runs (one unrolled program per suffix took longer to compile than to run
    at LLaMA-2-7B)."""
    lm, eng, params = _setup(tiny_models["llama"][0], 2)
    ops = ModelOps(eng, batch_size=2)
    tokens = np.random.RandomState(0).randint(3, 100, size=(4, 16)).astype(np.int32)
    h = ops.hidden_states(params, tokens)
    for method in ("cumulative", "isolated"):
        sensitivity(ops, params, h, tokens, method, progress=False)
    modes = sorted(k[1] for k in ops._suffix)
    assert modes == ["spd", "sync"]
    assert all(f._cache_size() == 1 for f in ops._suffix.values())
    assert ops._head_nll_fn._cache_size() == 1


def test_sensitivity_at_tp2_is_not_zero_and_curve_consistent(tiny_models):
    eng, params, tokens, sens = _llama_sensitivity(tiny_models, 2)
    assert max(abs(v) for v in sens.s) > 1e-3
    # the cumulative curve telescopes: sum of s_i = PPL(all SPD) - PPL(no SPD)
    np.testing.assert_allclose(sum(sens.s), sens.ppl_curve[0] - sens.base_ppl, rtol=1e-6)
    # ... and PPL(all SPD) agrees with a full forward pass of the all-SPD model
    logits = np.asarray(eng.logits(params, tokens, plan=SyncPlan.from_flags((True,) * 3)), np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lp[:, :-1], tokens[:, 1:, None], -1).mean()
    np.testing.assert_allclose(sens.ppl_curve[0], np.exp(nll), rtol=1e-4)


def test_classification_and_selection():
    s = [5.0, 0.1, 0.3, 2.0, -0.2]
    assert classify(s, 0.2, 1.0) == ["ESB", "ISB", "SB", "ESB", "ISB"]
    assert select_by_ratio(s, 0.4) == [1, 4]  # two least sensitive
    assert select_by_ratio(s, 0.0) == [] and select_by_ratio(s, 1.0) == [0, 1, 2, 3, 4]
    assert thresholds(10.0, None, None, 0.005, 0.02) == (0.05, 0.2)
    with pytest.raises(ConfigError, match=r"ratio must be in \[0, 1\]"):
        select_by_ratio(s, 1.5)
    # budget: ppl grows by 1 per dropped block from 10; 25% budget allows 2 blocks
    chosen, tried = select_by_budget(s, 10.0, 25.0, lambda blocks: 10.0 + len(blocks))
    assert chosen == [1, 4] and all(p <= 12.5 or n > 2 for n, p in tried)


def test_bad_pipeline_config_values(tmp_path):
    f = tmp_path / "p.yaml"
    for text, msg in [("tau1: 2.0\ntau2: 1.0\n", "tau1 < tau2"), ("tau1: 0.1\n", "give both tau1 and tau2"),
                      ("tau1_rel: 0.05\n", "tau1_rel < tau2_rel"), ("tp: 1\n", "needs tp >= 2"), ("ratio: 1.5\n", r"ratio must be in \[0, 1\]"),
                      ("ratio: -0.1\n", r"ratio must be in \[0, 1\]"), ("bogus: 1\n", "unknown key"),
                      ("distill:\n  lrr: 1\n", r"distill: unknown key\(s\) \[.lrr.\]"), ("hg_accept: maybe\n", "hg_accept")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=msg):
            load_pipeline_config(str(f), {})


def test_one_b2b_step_reduces_block_mse_on_real_weights(embedded):
    lm, tok = embedded
    eng = Engine.create(build_model_def(lm.cfg, 3), emulate=True)
    params = load_params(eng, lm.source)
    ops = ModelOps(eng, batch_size=4)
    calib = calibration_tokens(DataSpec("wiki", 4, 64, 0), tok, lm.cfg.eos_token_ids[0])
    h = ops.hidden_states(params, calib)
    i = 5
    d = BlockDistiller(ops, DistillConfig(epochs=1, batch_size=4))  # one step, the paper's lr 5e-5
    res = d.distill(i, params["layers"][i], h[i], h[i + 1], progress=False)
    assert res.status == "ok" and len(res.losses) == 1
    assert res.final_mse < res.initial_mse
    # only this block's parameters: the caller's block is untouched (not donated, not modified)
    chex.assert_trees_all_equal(params["layers"][i], load_params(eng, lm.source)["layers"][i])


def test_b2b_nan_keeps_original_weights(tiny_models):
    lm, eng, params = _setup(tiny_models["llama"][0], 2)
    ops = ModelOps(eng, batch_size=4)
    tokens = np.random.RandomState(0).randint(3, 100, size=(4, 16)).astype(np.int32)
    h = ops.hidden_states(params, tokens)
    res = BlockDistiller(ops, DistillConfig(lr=1e30, epochs=3, batch_size=2, optimizer="sgd")).distill(
        1, params["layers"][1], h[1], h[2], progress=False)
    assert res.status in ("nan", "diverged") and "kept the original weights" in res.message
    chex.assert_trees_all_equal(res.params, params["layers"][1])


def test_teacher_states_memory_mapped_equal_in_memory(tiny_models, tmp_path):
    lm, eng, params = _setup(tiny_models["llama"][0], 2)
    ops = ModelOps(eng, batch_size=3)
    tokens = np.random.RandomState(0).randint(3, 100, size=(7, 10)).astype(np.int32)
    mem = ops.hidden_states(params, tokens)
    mapped = ops.hidden_states(params, tokens, store=str(tmp_path / "h"))
    assert isinstance(mapped, np.memmap) and (tmp_path / "h.host0").is_file()
    chex.assert_shape(mem, (4, 7, 10, lm.cfg.hidden))
    chex.assert_trees_all_equal(np.asarray(mapped), mem)


@pytest.mark.parametrize("kind", ["opt", "llama"])
def test_head_permutation_is_invisible_in_sync_mode(tiny_models, kind):
    lm, eng, params = _setup(tiny_models[kind][0], 2)
    ops = ModelOps(eng)
    cfg, lay = lm.cfg, eng.mdef.layout
    x = np.random.RandomState(1).randn(2, 12, cfg.hidden).astype(np.float32)
    bp = params["layers"][1]
    per = cfg.n_heads // lay.kv_heads
    # units 0 and 2 now share device 0 (with MLP shard 1): a pairing that changes the SPD block
    kv_order = [0, 2, 1, 3] + list(range(4, lay.kv_heads))
    q_order = [u * per + i for u in kv_order for i in range(per)]
    permuted = permute_block(bp, ops.block_infos, cfg, q_order, kv_order, [1, 0], 2)
    spec = eng.mdef.specs()["layers"][1]
    permuted = eng.from_global(permuted, spec)
    sync = jax.jit(ops.block_fn(spd=False))
    chex.assert_trees_all_close(np.asarray(sync(permuted, x)), np.asarray(sync(bp, x)), atol=1e-5, rtol=1e-5)
    spd = jax.jit(ops.block_fn(spd=True))
    assert np.abs(np.asarray(spd(permuted, x)) - np.asarray(spd(bp, x))).max() > 1e-4  # regrouping matters in SPD
    # the full HG procedure also leaves the sync block unchanged
    new, info = head_group_block(ops.block_graphdef, ops.block_infos, bp, x, cfg, lay)
    assert info["applied"]
    chex.assert_trees_all_close(np.asarray(sync(eng.from_global(new, spec), x)), np.asarray(sync(bp, x)),
                                atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["llama", "opt", "qwen3"])
def test_head_grouping_follows_the_block(tiny_models, monkeypatch, kind):
    """Grouping's MLP-output norms for the unchanged head layout equal the norms of the Z_i that the
    sharded SPD block itself computes; after a change to a block detail (the MLP activation) they still do,
    and differ from before: head grouping runs the model's own pieces, not a copy of them."""
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import PartitionSpec as P

    from spd_jax import model as model_mod
    from spd_jax.pipeline.grouping import mlp_norms

    tp = 2
    lm, eng, params = _setup(tiny_models[kind][0], tp)
    ops, cfg = ModelOps(eng), lm.cfg
    x = np.random.RandomState(4).randn(3, 10, cfg.hidden).astype(np.float32)
    i = 1
    bp_global = eng.to_global(params["layers"][i], eng.mdef.specs()["layers"][i])
    per_shard = cfg.n_heads // tp
    contiguous = [list(range(j * per_shard, (j + 1) * per_shard)) for j in range(tp)]

    def sharded_norms():
        def shard(bp, xs):
            blk = nnx.merge(ops.block_graphdef, bp)
            rope, mask = model_mod.fresh_inputs(cfg, xs.shape[1], jnp.zeros((xs.shape[0],), jnp.int32))
            y, _ = blk.attn(blk.attn_norm(xs), rope, mask, None, 0, False)
            z = blk.spd_mlp(xs, y, "full")
            return jnp.sqrt(jnp.sum(jnp.square(z), axis=(1, 2))).sum()[None]

        f = jax.jit(eng.sharded(shard, (ops.block_specs, P()), P("tp")))
        return np.asarray(f(params["layers"][i], eng.replicate(x)))

    def grouping_norms():
        return np.diag(mlp_norms(ops.block_graphdef, bp_global, x, cfg, contiguous, tp, "full"))

    before = grouping_norms()
    chex.assert_trees_all_close(before, sharded_norms(), rtol=1e-5)
    act = cfg.family.mlp
    monkeypatch.setitem(model_mod.ACTIVATIONS, act, lambda a: jnp.tanh(a) * 3.0)
    after = grouping_norms()
    chex.assert_trees_all_close(after, sharded_norms(), rtol=1e-5)
    assert np.abs(after - before).max() > 1e-3 * np.abs(before).max()


def test_hg_skipped_when_kv_heads_are_replicated(tiny_models):
    lm, eng, params = _setup(tiny_models["qwen2"][0], 4)  # 2 kv heads < tp 4
    ops = ModelOps(eng)
    x = np.zeros((1, 4, lm.cfg.hidden), np.float32)
    _, info = head_group_block(ops.block_graphdef, ops.block_infos, params["layers"][0], x, lm.cfg, eng.mdef.layout)
    assert not info["applied"] and "replicated" in info["reason"]


def test_pairwise_distances_equal_the_direct_formula():
    from spd_jax.pipeline.grouping import pairwise_distances

    maps = np.random.RandomState(0).rand(12, 7, 7).astype(np.float32) / 7  # softmax-like rows
    direct = np.sqrt(((maps.reshape(12, 1, -1).astype(np.float64) - maps.reshape(1, 12, -1)) ** 2).sum(-1))
    chex.assert_trees_all_close(pairwise_distances(maps), direct, atol=1e-7)
    assert (np.diag(pairwise_distances(maps)) == 0).all()


def test_scatter_and_match_find_the_optimum():
    # units 0,1 are far apart from each other, as are 2,3: the best split pairs far units together
    dist = np.array([[0, 9, 1, 1], [9, 0, 1, 1], [1, 1, 0, 9], [1, 1, 9, 0]], float)
    groups, how = scatter(dist, 2)
    assert how == "exhaustive" and sorted(groups) == [[0, 1], [2, 3]]
    big = np.random.RandomState(0).rand(24, 24)
    big = big + big.T
    groups, how = scatter(big, 2)  # 1.35M partitions: local search
    assert how == "local-search" and sorted(sum(groups, [])) == list(range(24)) and all(len(g) == 12 for g in groups)
    norms = np.array([[1.0, 5.0, 0.0], [4.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    assert match(norms) == ([1, 0, 2], "exhaustive")
    r = np.random.RandomState(1).rand(9, 9)
    from scipy.optimize import linear_sum_assignment

    perm, how = match(r)
    rows, cols = linear_sum_assignment(-r)
    assert how == "hungarian" and np.isclose(sum(r[g, perm[g]] for g in range(9)), r[rows, cols].sum())


def _maps_distance(n, seed):
    m = np.random.RandomState(seed).rand(n, 64)  # stand-ins for flattened attention maps
    return np.sqrt(((m[:, None] - m[None]) ** 2).sum(-1))


def _old_greedy(dist, tp):
    """The scatter this replaced: an empty group scored 0, so heads piled into partly filled groups."""
    k = dist.shape[0] // tp
    groups = [[] for _ in range(tp)]
    for u in sorted(range(dist.shape[0]), key=lambda u: -dist[u].sum()):
        max((g for g in groups if len(g) < k), key=lambda g: (sum(dist[u, v] for v in g), -len(g))).append(u)
    return groups


@pytest.mark.parametrize("n,tp", [(6, 2), (6, 3), (8, 2), (8, 4), (9, 3), (12, 3), (12, 4)])
def test_scatter_search_reaches_the_exhaustive_optimum(monkeypatch, n, tp):
    import spd_jax.pipeline.grouping as grouping

    for seed in range(4):
        d = _maps_distance(n, seed)
        best = max(grouping._within(d, g) for g in grouping._partitions(list(range(n)), n // tp))
        monkeypatch.setattr(grouping, "EXHAUSTIVE_LIMIT", 0)  # force the search path
        groups, how = grouping.scatter(d, tp)
        monkeypatch.undo()
        assert how == "local-search" and sorted(sum(groups, [])) == list(range(n))
        assert grouping._within(d, groups) >= best * (1 - 0.02), (n, tp, seed)


def test_scatter_beats_random_partitions_on_32_heads_over_8_devices():
    from spd_jax.pipeline.grouping import _within

    for seed in range(3):
        d = _maps_distance(32, seed)
        rng = np.random.RandomState(100 + seed)
        rand = [_within(d, [p[i * 4:(i + 1) * 4] for i in range(8)]) for p in (rng.permutation(32) for _ in range(1000))]
        p95 = np.percentile(rand, 95)
        groups, how = scatter(d, 8)
        assert how == "local-search" and all(len(g) == 4 for g in groups)
        assert _within(d, groups) > p95
        assert _within(d, _old_greedy(d, 8)) < p95  # the test can tell a scatter that does not scatter


@pytest.mark.parametrize("emulate", [False, True])
def test_checkpoint_roundtrip(tiny_models, tmp_path, emulate):
    lm, eng, params = _setup(tiny_models["opt"][0], 2, emulate=emulate)
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, eng, params, {"tp": 2, "stage": "done"})
    other = Engine.create(build_model_def(lm.cfg, 2), emulate=not emulate)  # readable by the other mode too
    for e in (eng, other):
        restored, state = load_checkpoint_params(tmp_path / "ck", e)
        assert state["stage"] == "done"
        chex.assert_trees_all_equal(jax.device_get(e.to_global(restored)), jax.device_get(eng.to_global(params)))
    with pytest.raises(ConfigError, match="written for tp=2, not tp=4"):
        load_checkpoint_params(tmp_path / "ck", Engine.create(build_model_def(lm.cfg, 4)))
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        load_checkpoint_params(tmp_path, eng)
    # a step of an unfinished run (state + one block) is not served as a model
    ck.save(2, eng, None, {"tp": 2, "stage": "planned"}, block=(params["layers"][1], eng.mdef.specs()["layers"][1]))
    with pytest.raises(ConfigError, match="has not finished.*--resume"):
        load_checkpoint_params(tmp_path / "ck", eng)
    # a finished block's own folder round-trips, into either mode
    ck.save_block("b1", eng, 1, params["layers"][1])
    for e in (eng, other):
        chex.assert_trees_all_equal(jax.device_get(e.to_global(ck.restore_block("b1", e, 1), e.mdef.specs()["layers"][1])),
                                    jax.device_get(eng.to_global(params["layers"][1], eng.mdef.specs()["layers"][1])))
    with pytest.raises(ConfigError, match="could not be restored"):
        ck.restore_block("missing", eng, 1)


@pytest.mark.parametrize("emulate", [False, True])
def test_block_in_training_resumes_on_the_devices_it_trains_on(tiny_models, tmp_path, emulate):
    """The restored optimizer state (incl. its scalar step count) lives where the block does: a resumed B2B
    step on real TP once failed with "incompatible devices" (count restored on one GPU, weights on two)."""
    import optax

    from spd_jax.pipeline.distill import DistillConfig, make_optimizer

    lm, eng, params = _setup(tiny_models["llama"][0], 2, emulate=emulate)
    bp = params["layers"][1]
    tx = make_optimizer(DistillConfig(), 1e-3, 10)
    step = jax.jit(lambda b, o: optax.apply_updates(b, tx.update(jax.tree.map(jnp.ones_like, b), o, b)[0]))
    opt = tx.init(bp)
    ck = Checkpointer(tmp_path / "ck")
    ck.save(1, eng, None, {"tp": 2, "stage": "planned"}, opt, block=(bp, eng.mdef.specs()["layers"][1]))
    bp2, opt2 = ck.restore_block_in_training(eng, 1, tx.init(params["layers"][0]))
    chex.assert_trees_all_equal(jax.device_get(opt2), jax.device_get(opt))
    chex.assert_trees_all_equal(*jax.device_get((step(bp2, opt2), step(bp, opt))))


# ----------------------------------------------------------------------------- kill and resume


def _pipeline_cmd(model, corpus, out, *extra):
    return [sys.executable, str(ROOT / "launch/train_distill.py"), "--model", str(model), "--tp", "2",
            "--emulate", "--data", str(corpus), "--calib-samples", "8", "--calib-len", "32", "--eval-tokens", "256",
            "--ratio", "1.0", "--tau1=-1e9", "--tau2=1e9", "--epochs", "4", "--lr", "1e-5",
            "--distill-batch-size", "2", "--save-every", "2", "--no-head-grouping", "--out", str(out), *extra]


def test_pipeline_state_reads_the_checkpoint_format_earlier_versions_wrote():
    """The state a checkpoint carries is JSON with block indices as strings; a state written before the stages
    were typed reads back and writes out unchanged, and a field this version does not know is refused by name."""
    from spd_jax.pipeline.stages import PipelineState

    saved = {"tp": 2, "config": {"ratio": 0.5}, "inputs": {"model": "m1", "data": "d1"}, "stage": "planned",
             "hg": {"3": {"applied": False, "reason": "kv heads replicated"}}, "b2b": {"1": {"status": "ok"}},
             "b2b_current": {"block": 4, "step": 25, "losses": [0.5], "initial_mse": 1.0},
             "ppl": {"no_spd": {"calib": 10.0, "eval": 11.0}}, "save": 7, "block_files": {"1": "block001_b2b"},
             "plan": {"blocks": []}}
    st = PipelineState.from_json(saved, "ck")
    assert st.block_files == {1: "block001_b2b"} and st.hg[3]["applied"] is False and st.b2b_current["step"] == 25
    assert st.to_json() == saved
    oldest = {k: v for k, v in saved.items() if k not in ("inputs", "plan")}  # before fingerprints; not yet planned
    assert PipelineState.from_json(oldest, "ck").to_json() == {**oldest, "inputs": None}
    with pytest.raises(ConfigError, match=r"\['phase'\].*another version of spd-jax"):
        PipelineState.from_json({**saved, "phase": 2}, "ck")


def test_resume_after_kill_gives_the_same_parameters(tokenized_tiny, tmp_path):
    model, corpus = tokenized_tiny
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    full = tmp_path / "full"
    r = subprocess.run(_pipeline_cmd(model, corpus, full, "--no-progress"), capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    killed = tmp_path / "killed"
    data = tmp_path / "data.jsonl"  # a copy of the corpus: edited below
    data.write_text(Path(corpus).read_text())
    p = subprocess.Popen(_pipeline_cmd(model, data, killed, "--no-progress"), stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    for line in p.stdout:
        seen.append(line)
        if "[checkpoint] saved block 1 step" in line:  # mid-distillation of the second block
            p.send_signal(signal.SIGKILL)
            break
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "".join(seen)[-2000:]
    assert not (killed / "report.json").exists()
    # while it runs, a step holds the state and the block in training; a finished block has its own folder
    steps = [d for d in (killed / "checkpoint").iterdir() if d.name.isdigit()]
    assert steps and all(not (d / "params").exists() for d in steps)
    assert any((d / "block").exists() for d in steps)
    assert (killed / "checkpoint" / "blocks" / "block000_b2b").is_dir()

    # the data edited in place (its lines reversed) is refused, naming what changed; the contents are compared,
    # not the path strings, so the model directory spelled with a trailing slash resumes
    original = data.read_text()
    data.write_text("\n".join(reversed(original.splitlines())))
    r = subprocess.run(_pipeline_cmd(model, data, killed, "--no-progress", "--resume"), capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert "error: --resume: the calibration data" in r.stderr and "content changed" in r.stderr, r.stderr[-2000:]
    data.write_text(original)
    r = subprocess.run(_pipeline_cmd(f"{model}/", data, killed, "--no-progress", "--resume"), capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "[resume] from checkpoint" in r.stdout and "block 1 step" in r.stdout
    assert not (killed / "checkpoint" / "blocks").exists()  # removed once the full parameters are saved

    lm = open_model(model)
    eng = Engine.create(build_model_def(lm.cfg, 2), emulate=True)
    a, _ = load_checkpoint_params(full / "checkpoint", eng)
    b, _ = load_checkpoint_params(killed / "checkpoint", eng)
    orig = load_params(eng, lm.source)
    assert np.abs(np.asarray(a["layers"][1]["mlp"]["up"]["w"]) - np.asarray(orig["layers"][1]["mlp"]["up"]["w"])).max() > 1e-4
    chex.assert_trees_all_close(jax.device_get(a), jax.device_get(b), atol=1e-6, rtol=1e-6)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (full, killed))
    assert all(v["status"] == "ok" and v["final_mse"] < v["initial_mse"] for v in ra["distillation"].values())
    assert ra["distillation"] == rb["distillation"] and ra["ppl"] == rb["ppl"]
    for f in ("plan.json", "sensitivity.png", "perplexity.png"):
        assert (killed / f).stat().st_size > 0

    # the result is served by launch/infer.py --checkpoint
    r = subprocess.run([sys.executable, str(ROOT / "launch/infer.py"), "--checkpoint", str(killed), "--model",
                        str(model), "--tp", "2", "--max-new-tokens", "3", "--json", "--no-warmup"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout)["spd_blocks"] == [0, 1, 2]


def test_b2b_on_student_inputs_trains_each_block_on_the_treated_models_states(tokenized_tiny, tmp_path):
    """distill.inputs=student: block i learns on the hidden state that the model with the SPD plan and the
    already distilled blocks 0..i-1 produces. Checked against a full forward of the final model (blocks
    before i are final when block i starts), not against the pipeline's own propagation."""
    from spd_jax.data import DataSpec, calibration_tokens
    from spd_jax.pipeline.config import PipelineConfig
    from spd_jax.pipeline.run import run_pipeline

    model, corpus = tokenized_tiny
    pc = PipelineConfig(model=str(model), tp=2, emulate=False, data=str(corpus), calib_samples=4, calib_len=16,
                        eval_tokens=64, ratio=1.0, tau1=-1e9, tau2=1e9, head_grouping=False,
                        distill=DistillConfig(epochs=2, batch_size=2, lr=1e-5, inputs="student"))
    report = run_pipeline(pc, tmp_path / "run", progress=False)
    b2b = report["distillation"]
    assert sorted(b2b) == ["0", "1", "2"] and all(v["inputs"] == "student" for v in b2b.values())
    lm, eng, orig = _setup(model, 2)
    final, _ = load_checkpoint_params(tmp_path / "run" / "checkpoint", eng)
    tok = lm.tokenizer()
    calib = calibration_tokens(DataSpec(str(corpus), 4, 16, 0), tok, lm.cfg.eos_token_ids[0])
    modes = (True, True, True)
    fwd = jax.jit(eng.forward(SyncPlan.from_flags(modes), return_hidden=True))
    h_student = [np.asarray(h) for h in fwd(final, calib, np.zeros((4,), np.int32), None, 0)[2]]
    ops = ModelOps(eng, batch_size=2)
    h_teacher = ops.hidden_states(orig, calib)
    d = BlockDistiller(ops, DistillConfig(batch_size=2))
    for i in range(3):  # block i's initial error: its original weights on the treated model's input
        want = d.mse(orig["layers"][i], h_student[i].astype(h_teacher.dtype), h_teacher[i + 1])
        assert b2b[str(i)]["initial_mse"] == pytest.approx(want, rel=1e-4)
    assert b2b["1"]["initial_mse"] != pytest.approx(d.mse(orig["layers"][1], h_teacher[1], h_teacher[2]), rel=1e-3)


# ----------------------------------------------------------------------------- latency at an accuracy budget

CAMPAIGN_7B_TP4 = ROOT / "docs/bench/2026-11-28-h200x4-tp4-campaign/c7/llama2-7b-tp4-nvlink-1proc.json"


def test_expected_latency_reads_and_interpolates_a_measured_benchmark():
    """On the raw JSON of a real 4x H200 run (LLaMA-2-7B shape, TP 4, NVLink): a plan dropping 16 blocks takes the
    measured r=0.50 row; 20 blocks lie between the rows of 16 and 22; the cut is against the row with none."""
    from spd_jax.pipeline.latency import expected_latency, read_bench

    raw = {r["label"]: r for r in json.loads(CAMPAIGN_7B_TP4.read_text())["rows"]}
    bench = read_bench(CAMPAIGN_7B_TP4, 32, 4)
    at16 = expected_latency(bench, 16)
    assert at16["how"] == "measured row r=0.50"
    assert at16["e2e_cut"] == pytest.approx(1 - raw["r=0.50"]["e2e_ms"] / raw["r=0.00"]["e2e_ms"])
    at20 = expected_latency(bench, 20)
    lo, hi = raw["r=0.50"], raw["r=0.70"]  # 16 and 22 blocks
    assert at20["e2e_ms"] == pytest.approx(np.interp(20, [16, 22], [lo["e2e_ms"], hi["e2e_ms"]]))
    assert at20["tpot_cut"] == pytest.approx(1 - np.interp(20, [16, 22], [lo["tpot_ms"], hi["tpot_ms"]])
                                             / raw["r=0.00"]["tpot_ms"])
    assert (at20["device"], at20["interconnect"], at20["n_devices"]) == ("NVIDIA H200", "nvlink", 4)
    with pytest.raises(ConfigError, match=r"llama2-7b \(32 blocks\) at TP 4; this model has 3 blocks at TP 2"):
        read_bench(CAMPAIGN_7B_TP4, 3, 2)


def test_the_pipeline_report_states_the_latency_its_plan_buys(tokenized_tiny, tmp_path):
    """A real CPU benchmark of the 4-block `tiny` shape at TP 2, and a pipeline run on a 4-block model: the report
    gives the latency of the chosen plan from that benchmark; a model of another depth is refused before any work."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from spd_jax.pipeline.config import PipelineConfig
    from spd_jax.pipeline.run import run_pipeline

    bench = tmp_path / "bench.json"
    r = subprocess.run([sys.executable, str(ROOT / "launch/bench.py"), "--shape", "tiny", "--tp", "2", "--prompt-len",
                        "8", "--new-tokens", "4", "--repeats", "1", "--spd-ratios", "0,0.5,1", "--json", str(bench)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    model3, corpus = tokenized_tiny
    settings = dict(tp=2, emulate=True, data=str(corpus), calib_samples=2, calib_len=16, eval_tokens=64, ratio=0.5,
                    head_grouping=False, latency_from=str(bench))
    with pytest.raises(ConfigError, match=r"tiny \(4 blocks\) at TP 2; this model has 3 blocks"):
        run_pipeline(PipelineConfig(model=str(model3), **settings), tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    model4 = tmp_path / "model4"
    torch.manual_seed(0)
    tok = PreTrainedTokenizerFast.from_pretrained(model3)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32,
                                 intermediate_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                 max_position_embeddings=128, tie_word_embeddings=True)).save_pretrained(model4)
    tok.save_pretrained(model4)
    pc = PipelineConfig(model=str(model4), **settings)
    pc.distill.epochs = 0
    lat = run_pipeline(pc, tmp_path / "run", progress=False)["expected_latency"]
    rows = {r["label"]: r for r in json.loads(bench.read_text())["rows"]}
    assert (lat["n_spd"], lat["how"]) == (2, "measured row r=0.50")
    assert lat["e2e_cut"] == pytest.approx(1 - rows["r=0.50"]["e2e_ms"] / rows["r=0.00"]["e2e_ms"])
