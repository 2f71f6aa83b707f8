"""Evaluation: log-likelihood scoring, acc_norm, perplexity, task loaders, and the sync-plan identity."""

import io
import json
import math
import tarfile

import numpy as np
import pytest
import torch

from bigbench_util import BIGBENCH
from spd_jax.evaluation import (
    MCItem,
    Scorer,
    accuracy,
    choice_loglikelihoods,
    evaluate_loaded,
    evaluate_task,
    perplexity,
)
from spd_jax.loading import load_params, open_model
from spd_jax.plan import SyncPlan
from spd_jax.runtime import Engine, build_model_def
from spd_jax.tasks import extract_bigbench, load_bigbench, load_task



class CharTokenizer:
    """One token per character (ids = code points)."""

    bos_token_id = 1

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [ord(c) for c in text]}


class ConstructedScorer:
    """A 'model' whose NLL for a token is 0 for the letter 'x' and 3 for anything else: the choice made
    of x's is certain to win acc."""

    batch_size = 4

    def token_scores(self, seqs):
        nll = [np.array([0.0 if t == ord("x") else 3.0 for t in s[1:]]) for s in seqs]
        return nll, [n == 0 for n in nll]

    def token_nll(self, seqs):
        return self.token_scores(seqs)[0]


def test_scoring_with_a_constructed_model_is_certain():
    items = [MCItem("Q: pick", [" yyy", " xxx", " zz"], gold=1), MCItem("Q: again", [" xx", " ab"], gold=0)]
    lls = choice_loglikelihoods(ConstructedScorer(), CharTokenizer(), items)
    assert lls[0] == [-12.0, -3.0, -9.0] and lls[1] == [-3.0, -9.0]  # the leading space costs 3
    r = evaluate_task(ConstructedScorer(), CharTokenizer(), "t", items)
    assert (r.acc, r.acc_norm, r.n) == (1.0, 1.0, 2)


def test_acc_norm_divides_by_characters():
    items = [MCItem("c", ["a", "a much longer answer"], gold=1)]
    lls = [[-2.0, -10.0]]  # total ll prefers the short one; per character the long one wins
    assert accuracy(items, lls) == (0.0, 1.0)


def test_lambada_and_winogrande_scoring_rules():
    # LAMBADA: correct only if every target token is the greedy prediction
    items = [MCItem("say", [" xx"], 0), MCItem("say", [" xa"], 0)]
    r = evaluate_loaded(ConstructedScorer(), CharTokenizer(), "lambada", "lambada", items)
    assert r.acc == 0.0  # the leading space is never greedy in the constructed model
    items = [MCItem("sa", ["xx"], 0), MCItem("sa", ["xa"], 0)]
    r = evaluate_loaded(ConstructedScorer(), CharTokenizer(), "lambada", "lambada", items)
    assert r.acc == 0.5
    # WinoGrande partial scoring: the same suffix after each option-filled prefix; here the suffix
    # costs the same, so the first option wins on ties (argmax) -> gold 0 right, gold 1 wrong
    pairs = [([MCItem("a", [" xx"], 0), MCItem("b", [" xx"], 0)], 0),
             ([MCItem("a", [" xx"], 0), MCItem("b", [" xx"], 0)], 1)]
    assert evaluate_loaded(ConstructedScorer(), CharTokenizer(), "wg", "winogrande", pairs).acc == 0.5


def test_perplexity_equals_exp_mean_nll_from_pytorch(tiny_models):
    path, ref = tiny_models["opt"]
    lm = open_model(path)
    eng = Engine.create(build_model_def(lm.cfg, 4))
    sc = Scorer(eng, load_params(eng, lm.source), SyncPlan.sync(3), batch_size=2)
    windows = np.random.RandomState(0).randint(3, 100, size=(3, 20)).astype(np.int32)
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor(windows, dtype=torch.long)).logits.double(), -1).numpy()
    nll = -np.take_along_axis(logp[:, :-1], windows[:, 1:, None], -1).mean()
    np.testing.assert_allclose(perplexity(sc, windows), math.exp(nll), rtol=1e-5)


def _guide_perplexity(model, ids, window, stride):
    """The transformers perplexity guide's loop (docs: "Perplexity of fixed-length models"), on CPU in float32:
    windows every `stride` tokens, labels -100 on the context part, each window's mean loss weighted by the
    targets it scores."""
    ids = torch.tensor(ids, dtype=torch.long)[None]
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, ids.size(1), stride):
        end = min(begin + window, ids.size(1))
        trg_len = end - prev_end
        input_ids = ids[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        n = int((target != -100).sum()) - 1 if trg_len == end - begin else trg_len
        nll_sum += float(loss) * n
        n_tokens += n
        prev_end = end
        if end == ids.size(1):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.mark.parametrize("stride", [64, 24])
def test_stream_perplexity_is_the_transformers_guides_number(tiny_models, stride):
    """Sliding windows over one token stream equal the transformers guide's perplexity on the same tokens (the
    number users compare across tools), for non-overlapping windows and for a stride with overlap."""
    from spd_jax.evaluation import stream_perplexity

    path, ref = tiny_models["llama"]
    lm = open_model(path)
    eng = Engine.create(build_model_def(lm.cfg, 2))
    sc = Scorer(eng, load_params(eng, lm.source), SyncPlan.sync(3), batch_size=4)
    ids = np.random.RandomState(1).randint(3, 100, size=300).astype(np.int32)
    want, n = _guide_perplexity(ref.float(), ids, 64, stride)
    got = stream_perplexity(sc, ids, 64, stride)
    assert got.tokens == n and got.stream_tokens == 300 and got.window == 64 and got.stride == stride
    np.testing.assert_allclose(got.value, want, rtol=1e-4)


def test_ppl_file_is_scored_as_one_token_stream(tokenized_tiny, tmp_path, capsys):
    """`evaluate.py --ppl-file` scores the file as the tokenizer reads it whole (no EOS between paragraphs, no
    reset at blank lines), with the window and stride it states: transformers' number within 1%."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spd_jax.commands.evaluate import main

    model, corpus = tokenized_tiny
    text = "\n\n".join(json.loads(line)["text"][:300] for line in corpus.read_text().splitlines()[:6])
    f = tmp_path / "chapter.txt"
    f.write_text(text)
    assert main(["--model", str(model), "--tp", "2", "--ppl-file", str(f), "--ppl-len", "64", "--ppl-stride", "32",
                 "--ppl-tokens", "100000", "--tasks", "none", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)["perplexity"]
    ids = AutoTokenizer.from_pretrained(model)(text)["input_ids"]
    assert out["stream_tokens"] == len(ids) and (out["window"], out["stride"]) == (64, 32)
    want, n = _guide_perplexity(AutoModelForCausalLM.from_pretrained(model).float().eval(), ids, 64, 32)
    assert out["tokens"] == n
    np.testing.assert_allclose(out["value"], want, rtol=0.01)


def test_accuracies_carry_lm_evals_standard_error():
    from spd_jax.evaluation import TaskResult, accuracy_stderr, mean_accuracy_stderr

    scores = np.random.RandomState(0).rand(57) < 0.4
    se = np.std(scores.astype(float), ddof=1) / math.sqrt(len(scores))  # lm-eval's acc_stderr
    np.testing.assert_allclose(accuracy_stderr(scores.mean(), len(scores)), se, rtol=1e-12)
    rs = [TaskResult("a", 57, scores.mean(), 0.5), TaskResult("b", 20, 0.25, 0.25)]
    np.testing.assert_allclose(mean_accuracy_stderr(rs), math.sqrt(se ** 2 + 0.25 * 0.75 / 19) / 2, rtol=1e-12)


def test_agreement_and_kl_with_every_decode_path(tokenized_tiny, tmp_path, capsys):
    """--fused-projections / --fold-norms used to skip the comparison with the unmodified model silently; it now
    runs in the layout evaluated, and gives the reference layout's numbers."""
    from spd_jax.commands.evaluate import main

    path, corpus = tokenized_tiny
    f = tmp_path / "text.txt"
    f.write_text(json.loads(corpus.read_text().splitlines()[0])["text"][:1500])
    runs = []
    for layout in ([], ["--fused-projections", "--fold-norms"]):
        assert main(["--model", str(path), "--tp", "2", "--spd-blocks", "all", "--ppl-file", str(f), "--ppl-len", "32",
                     "--tasks", "none", "--json", *layout]) == 0
        runs.append(json.loads(capsys.readouterr().out))
    a, b = (r["vs_unmodified"] for r in runs)
    assert a["positions"] == b["positions"] > 0 and a["kl_mean"] > 0
    assert abs(a["top1_agreement"] - b["top1_agreement"]) <= 2 / a["positions"]
    np.testing.assert_allclose(b["kl_mean"], a["kl_mean"], rtol=0.05)  # float32 rounding of a KL of ~3e-6


def test_sync_plan_reproduces_no_spd_numbers_exactly(embedded, tmp_path):
    from spd_jax.config import RunConfig
    from spd_jax.inference import open_session
    from spd_jax.plan import plan_from_modes, save_plan

    lm, tok = embedded
    save_plan(plan_from_modes((False,) * lm.cfg.n_layers, tp=3), tmp_path / "plan.json")
    items = [MCItem("The capital of France is", [" Paris", " a banana", " London"], 0),
             MCItem("Two plus two equals", [" four", " seven"], 0)]
    windows = np.asarray([tok("The quick brown fox jumps over the lazy dog. " * 4)["input_ids"][:40]], np.int32)
    results = []
    for extra in ({}, {"spd_plan": str(tmp_path / "plan.json")}):
        sess = open_session(RunConfig(model="embedded", tp=3, emulate=True, **extra))
        assert not sess.plan.any_spd
        sc = Scorer(sess.engine, sess.params, sess.plan, batch_size=4)
        results.append((choice_loglikelihoods(sc, tok, items), perplexity(sc, windows)))
    assert results[0] == results[1]  # bit-identical
    lls = results[0][0]
    assert int(np.argmax(lls[0])) == 0  # and the real model knows its capitals


def test_bigbench_loader_and_extraction(tmp_path):
    task = {"name": "t", "append_choices_to_input": True,
            "examples": [{"input": "How many legs do horses have?", "target_scores": "{'two': 0, 'four': 1}"}]}
    buf = json.dumps(task).encode()
    sdist = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("bigbench-1.0.0/bigbench/benchmark_tasks/general_knowledge/task.json")
        info.size = len(buf)
        tf.addfile(info, io.BytesIO(buf))
    [path] = extract_bigbench(sdist, tmp_path / "cache", tasks=("general_knowledge",))
    [item] = load_bigbench(path)
    assert item.context == "Q: How many legs do horses have?\n  choice: two\n  choice: four\nA:"
    assert item.choices == [" two", " four"] and item.gold == 1


@pytest.mark.skipif(not BIGBENCH, reason="no BIG-bench tasks: run launch/evaluate.py --download-bigbench")
def test_shared_bigbench_tasks_load():
    from spd_jax.tasks import DEFAULT_TASKS

    for t in DEFAULT_TASKS:
        name, fmt, items = load_task(t, limit=5, search=[BIGBENCH])
        assert fmt == "bigbench" and len(items) == 5 and all(0 <= it.gold < len(it.choices) for it in items)


def test_jsonl_formats(tmp_path):
    rows = {
        "arc_easy.jsonl": {"question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"},
        "piqa.jsonl": {"goal": "g", "sol1": "s1", "sol2": "s2", "label": 1},
        "hellaswag.jsonl": {"activity_label": "Act", "ctx_a": "a", "ctx_b": "b", "ctx": "a b",
                            "endings": ["e1", "e2", "e3", "e4"], "label": "2"},
        "sciq.jsonl": {"question": "q", "support": "s", "correct_answer": "c", "distractor1": "d1",
                       "distractor2": "d2", "distractor3": "d3"},
        "winogrande.jsonl": {"sentence": "The cup fell because _ was heavy.", "option1": "the cup",
                             "option2": "the table", "answer": "1"},
        "lambada.jsonl": {"text": "he said hello"},
    }
    expect = {"arc_easy": ("arc", 1), "piqa": ("piqa", 1), "hellaswag": ("hellaswag", 2), "sciq": ("sciq", 3)}
    for fname, row in rows.items():
        (tmp_path / fname).write_text(json.dumps(row) + "\n")
        name, fmt, items = load_task(str(tmp_path / fname))
        if name in expect:
            assert (fmt, items[0].gold) == expect[name]
    _, fmt, items = load_task(str(tmp_path / "winogrande.jsonl"))
    (a, b), gold = items[0]
    assert fmt == "winogrande" and a.context == "The cup fell because the cup" and a.choices == [" was heavy."]
    assert gold == 0
    _, fmt, items = load_task(str(tmp_path / "lambada.jsonl"))
    assert fmt == "lambada" and items[0].context == "he said" and items[0].choices == [" hello"]


@pytest.mark.parametrize("tp,emulate", [(2, False), (4, False), (2, True)])
def test_divergence_from_reference_equals_numpy_on_full_logits(tiny_models, tp, emulate):
    """KL(p_sync || p_spd) and top-1 agreement computed inside the shards (vocab 101: padded columns)
    equal the same quantities from the gathered full logits in float64."""
    from spd_jax.evaluation import divergence_from_reference
    from spd_jax.loading import load_params, open_model
    from spd_jax.runtime import Engine, build_model_def

    lm = open_model(tiny_models["llama"][0])
    eng = Engine.create(build_model_def(lm.cfg, tp), emulate=emulate)
    params = load_params(eng, lm.source)
    tokens = np.random.RandomState(3).randint(3, 100, size=(5, 12)).astype(np.int32)
    modes = (True, False, True)
    got = divergence_from_reference(eng, params, params, SyncPlan.from_flags(modes), tokens, batch_size=2)

    def logp(m):
        lg = np.asarray(eng.logits(params, tokens, plan=SyncPlan.from_flags(m)), np.float64)[:, :, :lm.cfg.vocab_size]
        lg = lg - lg.max(-1, keepdims=True)
        return lg - np.log(np.exp(lg).sum(-1, keepdims=True))

    ref, spd = logp((False,) * 3), logp(modes)
    kl = (np.exp(ref) * (ref - spd)).sum(-1)
    assert got["positions"] == tokens.size
    assert got["kl_mean"] == pytest.approx(kl.mean(), rel=1e-3, abs=1e-7) and got["kl_mean"] > 1e-6
    assert got["top1_agreement"] == pytest.approx((ref.argmax(-1) == spd.argmax(-1)).mean())
    same = divergence_from_reference(eng, params, params, SyncPlan.sync(3), tokens, batch_size=2)
    assert same["top1_agreement"] == 1.0 and abs(same["kl_mean"]) < 1e-6
