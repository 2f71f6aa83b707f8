"""One-shot all-reduces (collectives.py): equal on every device, equal to psum within rounding, and the
model gives the same logits and tokens with any method, in sync and SPD modes, prefill and decode."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from spd_jax.collectives import AllReduce
from spd_jax.config import GenerationConfig
from spd_jax.generate import Generator
from spd_jax.loading import load_params, open_model
from spd_jax.plan import SyncPlan
from spd_jax.runtime import Engine, build_model_def
from spd_jax.sharding import make_mesh


def _per_device(mesh, how, x_np):
    """Each device's result of all-reducing its row of x, stacked [tp, ...] (replication not assumed)."""
    f = jax.jit(jax.shard_map(lambda a: how(a[0], "tp")[None], mesh=mesh, in_specs=P("tp"), out_specs=P("tp"),
                              check_vma=False))
    return np.asarray(f(jax.device_put(x_np, NamedSharding(mesh, P("tp")))))


@pytest.mark.parametrize("tp", [2, 4, 8])
@pytest.mark.parametrize("method", ["gather", "a2a"])
@pytest.mark.parametrize("dtype", [np.float32, jnp.bfloat16])
def test_one_shot_sum_is_replicated_and_equals_psum(tp, method, dtype):
    mesh = make_mesh(tp)
    x = (np.random.RandomState(tp).randn(tp, 3, 40) * 10).astype(dtype)
    got = _per_device(mesh, AllReduce(method), x)
    for d in range(1, tp):  # bit-identical on every device: what replication means
        assert got[d].tobytes() == got[0].tobytes()
    exact = x.astype(np.float64).sum(0)
    ref = _per_device(mesh, AllReduce("psum"), x)[0].astype(np.float64)
    tol = 1e-5 if dtype == np.float32 else 2 ** -7  # bf16: within its rounding (8 mantissa bits)
    chex.assert_trees_all_close(got[0].astype(np.float64), exact, rtol=tol, atol=tol * np.abs(exact).max())
    chex.assert_trees_all_close(got[0].astype(np.float64), ref, rtol=tol, atol=tol * np.abs(exact).max())


def test_the_method_applies_up_to_max_bytes_then_psum():
    how = AllReduce("a2a", max_bytes=1024)
    assert how.choose(jnp.zeros((256,), jnp.float32)) == "a2a"  # 1024 bytes
    assert how.choose(jnp.zeros((257,), jnp.float32)) == "psum"
    assert not how.checkable and AllReduce("gather").checkable
    with pytest.raises(ValueError, match="unknown all-reduce method"):
        AllReduce("ring")


def _setup(tiny_models, kind, tp, emulate=False):
    lm = open_model(tiny_models[kind][0])
    eng = Engine.create(build_model_def(lm.cfg, tp), emulate=emulate)
    return lm, eng, load_params(eng, lm.source)


@pytest.mark.parametrize("kind,tp", [("llama", 2), ("opt", 4), ("llama", 8)])  # each family, each TP degree
def test_model_logits_and_tokens_equal_with_every_method(tiny_models, kind, tp):
    lm, eng, params = _setup(tiny_models, kind, tp)
    tokens = np.random.RandomState(1).randint(3, 90, size=(2, 11)).astype(np.int32)
    prompt = [5, 17, 42, 8]
    gen = GenerationConfig(max_new_tokens=6, stop_at_eos=False)
    for base in (SyncPlan.sync(3), SyncPlan.from_spec("0,2", 3)):
        ref = np.asarray(eng.logits(params, tokens, plan=base))
        ref_tokens = Generator(eng, params, base).generate([prompt], gen).tokens
        for method in ("gather", "a2a"):
            plan = base.using(AllReduce(method))
            chex.assert_trees_all_close(np.asarray(eng.logits(params, tokens, plan=plan)), ref, atol=2e-5, rtol=1e-5)
            assert Generator(eng, params, plan).generate([prompt], gen).tokens == ref_tokens  # prefill + decode


def test_emulated_tp_runs_one_shot_methods_too(tiny_models):
    lm, eng, params = _setup(tiny_models, "llama", 4, emulate=True)
    tokens = np.random.RandomState(2).randint(3, 90, size=(1, 9)).astype(np.int32)
    plan = SyncPlan.from_spec("1", 3)
    ref = np.asarray(eng.logits(params, tokens, plan=plan))
    for method in ("gather", "a2a"):
        got = np.asarray(eng.logits(params, tokens, plan=plan.using(AllReduce(method))))
        chex.assert_trees_all_close(got, ref, atol=2e-5, rtol=1e-5)


def test_the_compiled_program_uses_the_chosen_collective(tiny_models):
    """Small messages: no all-reduce left with a2a (the block and embedding sums become all-to-alls);
    above max_bytes: psum again."""
    lm, eng, params = _setup(tiny_models, "llama", 4)
    tokens, pad = eng.replicate(np.zeros((1, 8), np.int32)), eng.replicate(np.zeros((1,), np.int32))

    def hlo(plan):
        fwd = eng.forward(plan)
        return jax.jit(lambda p, t, d: fwd(p, t, d, None, jnp.int32(0))[0]).lower(params, tokens, pad).as_text()

    count = lambda text, op: text.count(op.replace("-", "_")) + text.count(op)  # noqa: E731
    small = hlo(SyncPlan.sync(3).using(AllReduce("a2a")))
    assert count(small, "all-reduce") == 0 and count(small, "all-to-all") >= 7  # 2 per block + embedding
    big = hlo(SyncPlan.sync(3).using(AllReduce("a2a", max_bytes=64)))
    assert count(big, "all-to-all") == 0 and count(big, "all-reduce") >= 7


# ---- auto: the method per message size from a measured choice table ----

TABLE = ((8192, "a2a"), (1 << 20, "psum"), (64 << 20, "gather"))


@pytest.mark.parametrize("nbytes, expect", [
    (2, "a2a"), (8192, "a2a"), (90_000, "a2a"),  # nearest in log scale: 90 000 B is nearer 8 KiB than 1 MiB
    (100_000, "psum"), (1 << 20, "psum"), (8 << 20, "psum"), (9 << 20, "gather"), (1 << 30, "gather")])
def test_auto_uses_the_method_measured_fastest_at_the_nearest_size(nbytes, expect):
    how = AllReduce("auto", table=TABLE)
    assert how.choose(jnp.zeros((nbytes,), jnp.int8)) == expect
    assert how.methods == {"a2a", "psum", "gather"} and not how.checkable
    assert AllReduce("auto", table=((8192, "gather"), (1 << 20, "psum"))).checkable


@pytest.mark.parametrize("gather_us, expect", [(25.7, "psum"), (23.7, "psum"), (23.6, "gather"), (20.0, "gather")])
def test_choice_table_keeps_psum_unless_another_method_wins_by_the_margin(gather_us, expect):
    """psum at 26.3 us: a one-shot method must be more than 10% faster (< 23.67 us) to be chosen; the
    margin is a parameter (0 = plain argmin) and psum-free rows take their argmin."""
    from spd_jax.collectives import choice_table

    row = {"bytes": 8192, "in_loop_us_by_method": {"psum": 26.3, "gather": gather_us, "a2a": 27.8}}
    assert choice_table([row]) == ((8192, expect),)
    assert choice_table([row], margin=0.0) == ((8192, "gather"),)
    assert choice_table([{"bytes": 8192, "in_loop_us_by_method": {"gather": 30.0, "a2a": 29.0}}]) == ((8192, "a2a"),)
    with pytest.raises(ValueError, match="margin"):
        choice_table([row], margin=1.0)


def test_auto_refuses_a_missing_or_malformed_table():
    with pytest.raises(ValueError, match="needs a measured choice table"):
        AllReduce("auto")
    with pytest.raises(ValueError, match="bad choice-table entry"):
        AllReduce("auto", table=((8192, "ring"),))
    with pytest.raises(ValueError, match="ascending"):
        AllReduce("auto", table=((1 << 20, "psum"), (8192, "a2a")))


def test_the_default_bound_keeps_prefill_on_psum():
    """The default max_bytes (256 KiB, measured: the all-to-all loses to NCCL at 1 MiB at TP 4): batch-1 decode
    of a 7B (8 KiB) and a batch of 32 (256 KiB) take the one-shot method; a 128-token 7B prefill (1 MiB) psum."""
    how = AllReduce("a2a")
    assert how.choose(jnp.zeros((1, 4096), jnp.bfloat16)) == "a2a"
    assert how.choose(jnp.zeros((32, 4096), jnp.bfloat16)) == "a2a"
    assert how.choose(jnp.zeros((128, 4096), jnp.bfloat16)) == "psum"


def test_choice_table_from_a_measured_microbenchmark():
    """The table is the per-size argmin of what the microbenchmark measured (on simulated devices here)."""
    from spd_jax.measure import allreduce_microbench
    from spd_jax.collectives import choice_table

    rows = allreduce_microbench(make_mesh(4), (8192, 65536), repeats=3, methods=("psum", "gather", "a2a"))
    table = choice_table(rows, margin=0.0)
    assert [b for b, _ in table] == [8192, 65536]
    for (b, m), row in zip(table, rows):
        by = row["in_loop_us_by_method"]
        assert set(by) == {"psum", "gather", "a2a"} and by[m] == min(by.values())
    for (b, m), row in zip(choice_table(rows), rows):  # with the default margin: psum unless beaten by > 10%
        by = row["in_loop_us_by_method"]
        assert m == "psum" or by[m] < 0.9 * by["psum"]
    with pytest.raises(ValueError, match="no all-reduce timings by method"):
        choice_table([{"bytes": 8192, "in_loop_us": 30.0}])  # a psum-only run cannot choose


@pytest.mark.parametrize("n", [2, 4])
def test_microbenchmark_loops_compute_what_they_claim(n):
    """The timed loops do the communication they are named after (NumPy reference): k all-reduces scaled by
    1/n leave the rank mean on every rank; k exchanges shift the rows k places round the ring. And the
    cost of one exchange is reported per size when asked for."""
    from spd_jax.measure import allreduce_microbench, ar_chain

    mesh = make_mesh(n)
    x_np = np.arange(n * 8, dtype=np.float32).reshape(n, 8)
    x = jax.device_put(jnp.asarray(x_np, jnp.bfloat16), NamedSharding(mesh, P("tp", None)))
    for method in ("psum", "gather", "a2a"):
        out = np.asarray(ar_chain(mesh, 3, method)(x), np.float32)
        np.testing.assert_allclose(out, np.broadcast_to(x_np.mean(0), (n, 8)), rtol=1e-2)
    for k in (1, 3):
        np.testing.assert_array_equal(np.asarray(ar_chain(mesh, k, "exchange")(x), np.float32),
                                      np.roll(x_np, k, axis=0))
    rows = allreduce_microbench(mesh, (8192, 65536), repeats=2, time_exchange=True)
    assert [r["bytes"] for r in rows] == [8192, 65536]
    for r in rows:
        assert np.isfinite(r["one_exchange_us"]) and r["one_exchange_us"] >= 0
    assert "one_exchange_us" not in allreduce_microbench(mesh, (8192,), repeats=2)[0]


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_allreduce_message_bytes_are_what_the_model_all_reduces(tiny_models, kind, monkeypatch):
    """The sizes `launch/bench.py --allreduce-methods auto` adds to its measurement are the sizes of the
    messages the blocks hand to the all-reduce (recorded at trace time) in prefill and decode, batch 1
    (shadow row) and batch 3, with a prompt that prefill pads."""
    from spd_jax.generate import allreduce_message_bytes

    lm, eng, params = _setup(tiny_models, kind, 2)
    seen = set()
    choose = AllReduce.choose
    monkeypatch.setattr(AllReduce, "choose", lambda self, x: seen.add(x.size * x.dtype.itemsize) or choose(self, x))
    plan = SyncPlan.sync(3).using(AllReduce("a2a"))
    for batch in (1, 3):
        seen.clear()
        Generator(eng, params, plan).generate([[5, 17, 42, 8, 9]] * batch,
                                              GenerationConfig(max_new_tokens=3, stop_at_eos=False))
        want = allreduce_message_bytes(lm.cfg.hidden, params_dtype(params), batch, 5)
        assert seen == set(want.values()), (batch, seen, want)


def params_dtype(params):
    """The floating dtype of the parameters (what the residual stream carries)."""
    return next(leaf.dtype for leaf in jax.tree.leaves(params) if jnp.issubdtype(leaf.dtype, jnp.floating))


@pytest.mark.parametrize("kind", ["llama", "opt"])
def test_model_with_auto_equals_psum_and_compiles_each_chosen_collective(tiny_models, kind):
    """A table whose boundary falls between the decode and the prefill message: decode goes through the
    all-to-all, prefill through the all-gather; logits and generated tokens equal psum's."""
    lm, eng, params = _setup(tiny_models, kind, 4)
    tokens = np.random.RandomState(3).randint(3, 90, size=(1, 16)).astype(np.int32)
    d = lm.cfg.hidden * 4  # float32 bytes of one token's hidden state
    how = AllReduce("auto", table=((d, "a2a"), (16 * d, "gather")))  # boundary at 4 tokens' worth
    assert how.choose(jnp.zeros((2, lm.cfg.hidden))) == "a2a" and how.choose(jnp.zeros((16, lm.cfg.hidden))) == "gather"
    gen = GenerationConfig(max_new_tokens=5, stop_at_eos=False)
    for base in (SyncPlan.sync(3), SyncPlan.from_spec("1", 3)):
        plan = base.using(how)
        chex.assert_trees_all_close(np.asarray(eng.logits(params, tokens, plan=plan)),
                                    np.asarray(eng.logits(params, tokens, plan=base)), atol=2e-5, rtol=1e-5)
        assert (Generator(eng, params, plan).generate([[5, 17, 42, 8]], gen).tokens
                == Generator(eng, params, base).generate([[5, 17, 42, 8]], gen).tokens)
    pad = eng.replicate(np.zeros((1,), np.int32))
    fwd = eng.forward(SyncPlan.sync(3).using(how))
    text = jax.jit(lambda p, t, q: fwd(p, t, q, None, jnp.int32(0))[0]).lower(
        params, eng.replicate(tokens), pad).as_text()
    assert "all_gather" in text or "all-gather" in text  # the 16-token prefill messages
    assert "all_reduce" not in text and "all-reduce" not in text
