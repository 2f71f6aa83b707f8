"""The accuracy study (`launch/study.py`): a killed study continues from its state folder and ends with the
rows of an uninterrupted study; its results page keeps the hand-written notes."""


import numpy as np
import pytest

from bigbench_util import BIGBENCH
from spd_jax.config import ConfigError
from spd_jax.pipeline.distill import DistillConfig
from spd_jax.pipeline.config import PipelineConfig
from spd_jax.pipeline.study import NOTES_MARKER, StudyState, run_study, write_results_md



class Killed(Exception):
    pass


def _config(model, corpus):
    return PipelineConfig(model=str(model), tp=2, emulate=True, data=str(corpus), calib_samples=4, calib_len=16, eval_tokens=64,
                          batch_size=2, hg_samples=2, hg_accept="always",
                          distill=DistillConfig(epochs=1, batch_size=2))


@pytest.mark.skipif(not BIGBENCH, reason="no BIG-bench tasks: run launch/evaluate.py --download-bigbench")
def test_killed_study_resumes_and_ends_with_the_uninterrupted_rows(tokenized_tiny, tmp_path):
    model, corpus = tokenized_tiny
    pc, ratios, limit, tasks = _config(model, corpus), [1.0], 2, [BIGBENCH]
    state = tmp_path / "state"

    def kill_after_first_spd_row(msg):
        if "ratio 1.00 ZS " in msg:
            raise Killed(msg)

    with pytest.raises(Killed):
        run_study(pc, ratios, limit, tasks, tmp_path / "a.json", log=kill_after_first_spd_row, state_dir=state)
    assert (state / "progress.json").exists()

    logs = []
    resumed = run_study(pc, ratios, limit, tasks, tmp_path / "b.json", log=logs.append, state_dir=state)
    assert any("resuming" in m and "3 blocks distilled, 1 rows evaluated" in m for m in logs), logs
    assert not any(m.startswith("[study] block ") for m in logs)  # no block distilled again
    assert not state.exists()  # removed when the study ended

    fresh = run_study(pc, ratios, limit, tasks, tmp_path / "c.json", log=lambda m: None)
    assert [(r["ratio"], r["method"]) for r in resumed["rows"]] == [(r["ratio"], r["method"]) for r in fresh["rows"]]
    assert len(fresh["rows"]) == 3  # ZS / ZS+B2B / ZS+B2B+HG at 100%
    for a, b in zip(resumed["rows"], fresh["rows"]):
        np.testing.assert_allclose([a["ppl"], a["kl_mean"], a["top1_agreement"]],
                                   [b["ppl"], b["kl_mean"], b["top1_agreement"]], rtol=1e-6, atol=1e-9)
        assert a["tasks"] == b["tasks"]
    # the treated rows differ from zero-shot: the restored blocks are the distilled ones, not the originals
    zs, b2b = (next(r for r in fresh["rows"] if r["method"] == m) for m in ("ZS", "ZS+B2B"))
    assert zs["ppl"] != b2b["ppl"]
    assert resumed["seconds"] > 0


def test_state_of_another_study_is_refused(tmp_path):
    st = StudyState(tmp_path / "s", "fingerprint-a")
    st.add_row({"ratio": 0.0, "method": "no SPD"})
    assert StudyState(tmp_path / "s", "fingerprint-a").row(0.0, "no SPD") == {"ratio": 0.0, "method": "no SPD"}
    with pytest.raises(ConfigError, match="other settings"):
        StudyState(tmp_path / "s", "fingerprint-b")
    (tmp_path / "s" / "progress.json").write_text("{not json")
    with pytest.raises(ConfigError, match="unreadable"):
        StudyState(tmp_path / "s", "fingerprint-a")


def test_results_page_keeps_the_notes_below_the_marker(tmp_path):
    rows = [{"ratio": 0.0, "n_dropped": 0, "method": "no SPD", "ppl": 10.0, "top1_agreement": 1.0, "kl_mean": 0.0,
             "mean_acc": 0.5, "tasks": {"t": {"acc": 0.5, "acc_norm": 0.5, "n": 2}}}]
    study = {"rows": rows, "date": "2026-11-28", "machine": {"platform": "p", "cpus": 2, "jax": "x", "devices": "d"},
             "config": {"tp": 3, "emulate": True, "hg_accept": "if_better",
                        "distill": {"lr": 5e-5, "epochs": 10, "batch_size": 4}},
             "seconds": 60, "calib": [16, 256], "eval_tokens": 8192, "limit": 60}
    md = tmp_path / "results.md"
    md.write_text("# old table\n\n" + NOTES_MARKER + "\n\n## Notes\n\nhand-written analysis\n")
    write_results_md(study, md, tmp_path / "results.png", "python launch/study.py --limit 60")
    text = md.read_text()
    assert "old table" not in text and "| 0% | 0 | no SPD | 10.00 |" in text
    assert text.endswith(NOTES_MARKER + "\n\n## Notes\n\nhand-written analysis\n")
