"""The peer for the latency benchmark: Hugging Face transformers' own tensor parallelism on PyTorch.

Same shapes as `spd_jax.bench.SHAPES` (LLaMA family), RANDOM bf16 weights, batch 1, the same prompt and
new-token lengths. transformers shards the model with its predefined TP plan (`tp_plan="auto"`) over the
`torchrun` processes (one per GPU, NCCL; gloo on CPU). Two configurations, each labelled in its result:
  * eager (default): plain greedy `model.generate` with its default dynamic KV cache, no compilation,
    which is what a user gets from `from_pretrained(..., tp_plan="auto")`;
  * compiled (`compiled=True`): transformers' fastest setting, a static KV cache
    (`generation_config.cache_implementation = "static"`), with which `generate` compiles the decoding
    forward itself (`generation_config.compile_config`: torch.compile, mode "reduce-overhead" = CUDA
    graphs, fullgraph); warmed up until compiled. Compiling `model.forward` by hand on top of that (the
    older recipe) compiles twice and fails with "accessing tensor output of CUDAGraphs that has been
    overwritten" (seen on 4x H200, transformers 5.17, torch 2.11, at TP 1 and TP 4).

Timings (device-synchronised, after a warm-up):
  * ttft: `generate(max_new_tokens=1)`;
  * e2e: `generate(max_new_tokens=N, min_new_tokens=N)`;
  * tpot: (e2e - ttft) / (N - 1); medians over repeats.
torch is imported lazily: it is a test/benchmark dependency, not a runtime one.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np


def hf_llama_config(shape: str):
    from transformers import LlamaConfig

    from spd_jax.bench import SHAPES

    d = SHAPES[shape]
    if d["arch"] != "llama":
        raise ValueError(f"the transformers peer is implemented for LLaMA shapes, not {shape!r}")
    return LlamaConfig(vocab_size=d["vocab_size"], hidden_size=d["hidden"], num_hidden_layers=d["n_layers"],
                       num_attention_heads=d["n_heads"], num_key_value_heads=d["n_kv_heads"],
                       head_dim=d["head_dim"], intermediate_size=d["intermediate"],
                       max_position_embeddings=d["max_position"], rms_norm_eps=1e-5, tie_word_embeddings=False,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_checkpoint(shape: str, out_dir: str, seed: int = 0, shard_bytes: int = 4 << 30,
                    tokenizer: str | None = None) -> str:
    """Write a random-weight bf16 checkpoint of `shape` (safetensors shards + index).

    The model is built on the meta device and the shards are planned from its shapes, then drawn (on
    the GPU when there is one) and written one shard at a time: a 70B checkpoint never needs more than
    one shard of host memory. `tokenizer`: a Hugging Face tokenizer folder copied into the checkpoint
    (the vocabulary size and special tokens then follow it), so that the SPD pipeline can run on it."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaForCausalLM

    if os.path.exists(os.path.join(out_dir, "config.json")):
        return out_dir
    os.makedirs(out_dir, exist_ok=True)
    cfg = hf_llama_config(shape)
    cfg.dtype = "bfloat16"
    tok = None
    if tokenizer is not None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tokenizer)
        cfg.vocab_size = len(tok)
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    groups, size = [[]], 0  # names per shard
    for name, shp in shapes.items():
        nbytes = 2 * int(np.prod(shp))
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(seed)
    weight_map = {}
    for i, names in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name in names:
            if "norm" in name:
                tensors[name] = torch.ones(shapes[name], dtype=torch.bfloat16)
            else:
                draw = torch.randn(shapes[name], generator=gen, device=dev, dtype=torch.float32)
                tensors[name] = (0.02 * draw).to(torch.bfloat16).cpu()
            weight_map[name] = fname
        save_file(tensors, os.path.join(out_dir, fname), metadata={"format": "pt"})
    total = sum(2 * int(np.prod(shp)) for shp in shapes.values())
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
    if tok is not None:
        tok.save_pretrained(out_dir)
    cfg.save_pretrained(out_dir)  # last: its presence marks a complete checkpoint
    return out_dir


def run_peer(checkpoint: str, prompt_len: int, new_tokens: int, repeats: int, compiled: bool = False) -> dict | None:
    """Run under torchrun (WORLD_SIZE processes = TP degree). Returns the result on rank 0."""
    import torch
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    kw = {"dtype": torch.bfloat16}
    if world > 1:
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")
        kw["tp_plan"] = "auto"
    elif cuda:
        kw["device_map"] = "cuda"
    model = AutoModelForCausalLM.from_pretrained(checkpoint, **kw)
    model.eval()
    w = model.model.layers[0].self_attn.q_proj.weight
    local = tuple((w.to_local() if hasattr(w, "to_local") else w).shape)
    cfg = model.config
    if world > 1 and local[0] * world != cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads):
        raise RuntimeError(f"transformers did not shard q_proj over {world} processes (local shape {local})")
    if compiled:
        from transformers import CompileConfig

        model.generation_config.cache_implementation = "static"
        model.generation_config.compile_config = CompileConfig(fullgraph=True, mode="reduce-overhead")
    dev = model.device
    rng = np.random.RandomState(0)
    ids = torch.tensor(rng.randint(3, model.config.vocab_size, size=(1, prompt_len)), device=dev)

    def sync():
        if cuda:
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()

    def timed(n):
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                 do_sample=False, pad_token_id=0)
        sync()
        assert out.shape[1] == prompt_len + n, out.shape
        return (time.perf_counter() - t0) * 1e3

    timed(2)  # warm-up (CUDA/NCCL init, allocator)
    if compiled:  # compile (and capture graphs for) the prefill and decode shapes the timed runs use
        timed(1)
        timed(new_tokens)
        timed(new_tokens)
    ttft = [timed(1) for _ in range(repeats)]
    e2e = [timed(new_tokens) for _ in range(repeats)]
    t1, te = float(np.median(ttft)), float(np.median(e2e))
    res = {"peer": "transformers", "tp": world,
           "config": "static cache + torch.compile" if compiled else "eager, dynamic cache",
           "prompt_len": prompt_len, "new_tokens": new_tokens,
           "ttft_ms": t1, "e2e_ms": te, "tpot_ms": (te - t1) / max(new_tokens - 1, 1),
           "ttft_all": ttft, "e2e_all": e2e, "device": torch.cuda.get_device_name() if cuda else "cpu",
           "torch": torch.__version__, "random_weights": True, "q_proj_local_shape": list(local)}
    import transformers

    res["transformers"] = transformers.__version__
    if world > 1:
        dist.barrier()
    return res if rank == 0 else None


def write_result(res: dict | None, path: str | None) -> None:
    if res is None:
        return
    print(f"# transformers TP peer: tp={res['tp']} {res['prompt_len']}in/{res['new_tokens']}out on "
          f"{res['device']} (RANDOM weights): ttft {res['ttft_ms']:.2f} ms, tpot {res['tpot_ms']:.3f} ms, "
          f"e2e {res['e2e_ms']:.1f} ms")
    if path:
        with open(path, "w") as f:
            json.dump(res, f, indent=2)
