"""Head grouping where the scatter has freedom: the embedded SmolLM2-135M with its kv heads expanded.

The embedded model has 9 query heads over 3 kv heads (GQA). At TP 3 each device holds one kv group, so head
grouping cannot choose which heads share a device (a trivial scatter). Repeating each kv head for its 3 query heads
gives a model with 9 kv heads that computes the same function (its logits are checked equal to the original's
here, in transformers' PyTorch model), in which TP 3 places 3 heads per device: 280 ways to split 9 heads into
3 groups of 3. This script writes that model as a Hugging Face folder and runs the SPD pipeline on it twice with
the same seed, data and plan: head grouping on (`hg_accept: always`, the paper's rule) and off, then tabulates
the perplexities by stage and each regrouped block's SPD-mode MSE.

  python experiments/hg_expanded_kv.py --out runs/hg-scatter            # ~30 min on 2 CPU cores
  python experiments/hg_expanded_kv.py --out runs/hg-scatter --table     # the table of a finished run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def expand_kv(out: Path) -> Path:
    """The embedded model with every kv head repeated for its query heads, as an HF folder (float32)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from spd_jax.embedded import resolve_model_path

    model_dir = out / "smollm2-135m-mha"
    if (model_dir / "config.json").exists():
        return model_dir
    gguf = resolve_model_path("embedded")
    src = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = src.config
    rep, hd = cfg.num_attention_heads // cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    cfg_mha = type(cfg).from_dict({**cfg.to_dict(), "num_key_value_heads": cfg.num_attention_heads})
    dst = AutoModelForCausalLM.from_config(cfg_mha, dtype=torch.float32)
    state = src.state_dict()
    for k in list(state):
        if k.endswith(("self_attn.k_proj.weight", "self_attn.v_proj.weight")):  # [kv * hd, D] -> [heads * hd, D]
            w = state[k]
            state[k] = w.reshape(cfg.num_key_value_heads, hd, -1).repeat_interleave(rep, dim=0).reshape(-1, w.shape[1])
    dst.load_state_dict(state)
    ids = torch.tensor([tok("The capital of France is Paris, and the capital of Italy is")["input_ids"]])
    with torch.no_grad():
        a, b = src(ids).logits, dst(ids).logits
    err = (a - b).abs().max().item()
    assert err < 1e-4, f"the expanded model differs from the original: max |logit difference| {err}"
    print(f"expanded kv heads {cfg.num_key_value_heads} -> {cfg.num_attention_heads}: max |logit difference| "
          f"{err:.2e} on a 14-token prompt", flush=True)
    dst.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return model_dir


def run(model_dir: Path, out: Path, hg: bool) -> Path:
    run_dir = out / ("hg-on" if hg else "hg-off")
    if (run_dir / "report.json").exists():
        return run_dir
    cfg = out / ("hg-on.yaml" if hg else "hg-off.yaml")
    import yaml

    settings = yaml.safe_load((ROOT / "configs/spd_smollm2_tp3.yaml").read_text())
    settings.update(model=str(model_dir), head_grouping=hg, hg_accept="always")
    cfg.write_text(yaml.safe_dump(settings))
    cmd = [sys.executable, str(ROOT / "launch/train_distill.py"), "--config", str(cfg), "--out", str(run_dir),
           "--no-progress"] + (["--resume"] if (run_dir / "checkpoint").exists() else [])
    subprocess.run(cmd, check=True)
    return run_dir


def table(out: Path) -> str:
    on, off = (json.loads((out / d / "report.json").read_text()) for d in ("hg-on", "hg-off"))
    assert on["plan"]["blocks"] == off["plan"]["blocks"], "the two runs chose different plans"
    lines = ["| stage | HG off: calib / held-out ppl | HG on: calib / held-out ppl |", "|---|---|---|"]
    for k, name in (("no_spd", "no SPD"), ("zs", "ZS"), ("zs_hg", "ZS + HG"), ("final", "+ B2B (final)")):
        cell = lambda r: f"{r['ppl'][k]['calib']:.3f} / {r['ppl'][k]['eval']:.3f}" if k in r["ppl"] else "-"  # noqa: E731
        lines.append(f"| {name} | {cell(off)} | {cell(on)} |")
    lines += ["", "| block | scatter / match | SPD-mode block MSE before -> after HG |", "|---|---|---|"]
    for i, info in sorted(on["head_grouping"].items(), key=lambda kv: int(kv[0])):
        if info["applied"]:
            lines.append(f"| {i} | {info['scatter']} / {info['match']} | {info['block_mse_before']:.4g} -> "
                         f"{info['block_mse_after']:.4g} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--table", action="store_true", help="only print the table of the finished runs")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if not args.table:
        model_dir = expand_kv(out)
        for hg in (True, False):
            run(model_dir, out, hg)
    print(table(out))


if __name__ == "__main__":
    main()
