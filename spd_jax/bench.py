"""Latency benchmark: random-weight models of real shapes, SPD ratios side by side, the all-reduce floor.

Weights are RANDOM (initialised directly in their shards on device): these runs measure speed only.
For each SPD ratio r, the last round(r*L) blocks (or a plan's blocks) drop their attention all-reduce.
Timings (all device-synchronised, after a compile/warm-up run):
  * ttft: prefill of the prompt + first token;
  * decode: the on-device decode loop (one `lax.while_loop`, no host work per token) for new_tokens-1
    steps; per-token time = loop time / steps, median over `repeats` runs;
  * e2e: ttft + decode loop, median over repeats.
`floor` runs the same model with every all-reduce removed (compute-only lower bound).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from spd_jax.config import ConfigError, GenerationConfig, ModelConfig, RopeConfig
from spd_jax.generate import Generator
from spd_jax.runtime import Engine
from spd_jax.measure import host_times

# NCCL settings per interconnect mode, applied before JAX (and NCCL) start. NVLink multicast stays as the
# environment has it (NCCL_NVLS_ENABLE is never touched). A mode is what NCCL is allowed to use; whether
# it really slows the batch-1 all-reduces in a given setting is measured (`link_check`), not assumed:
#   nvlink: whatever NCCL picks (NVLink P2P on NVLink hosts);
#   pcie:   P2P off, shared memory on: GPU -> host memory -> GPU over PCIe, the path of hosts without
#           NVLink or P2P between their GPUs (the paper's LBW: "CUDA-direct link disabled");
#   net:    P2P and shared memory off, NCCL's socket transport over loopback TCP: what two hosts on
#           Ethernet see (one process per GPU needed: within one process NCCL connects the GPUs directly).
# `hbw` and `lbw` are the earlier names of nvlink and net, kept as aliases.
INTERCONNECT_ENV: dict[str, dict[str, str]] = {
    "nvlink": {},
    "pcie": {"NCCL_P2P_DISABLE": "1"},
    "net": {"NCCL_P2P_DISABLE": "1", "NCCL_SHM_DISABLE": "1", "NCCL_NET": "Socket", "NCCL_SOCKET_IFNAME": "lo"},
}
INTERCONNECT_ALIASES = {"hbw": "nvlink", "lbw": "net"}
INTERCONNECTS = sorted(INTERCONNECT_ENV) + sorted(INTERCONNECT_ALIASES)
NCCL_KEYS = sorted({k for env in INTERCONNECT_ENV.values() for k in env})
# A link counts as emulated when its in-loop 8 KiB all-reduce costs at least this many times nvlink's.
LINK_SLOWER_THRESHOLD = 1.5


def canonical_interconnect(mode: str) -> str:
    mode = INTERCONNECT_ALIASES.get(mode, mode)
    if mode not in INTERCONNECT_ENV:
        raise ValueError(f"unknown interconnect {mode!r}; known: {INTERCONNECTS}")
    return mode


def set_interconnect(mode: str) -> None:
    """Set (and, where another mode set them, clear) the NCCL variables of `mode` in os.environ."""
    mode = canonical_interconnect(mode)
    for k in NCCL_KEYS:
        if k in INTERCONNECT_ENV[mode]:
            os.environ[k] = INTERCONNECT_ENV[mode][k]
        elif mode != "nvlink" and k in os.environ:
            del os.environ[k]


def link_check(mode: str, allreduce: list[dict], reference: dict | None) -> dict:
    """Whether `mode` really made the small all-reduces slower than the nvlink reference run.

    `reference` is a bench JSON of the same shape/TP/process layout under nvlink. Returns
    {"status": "reference" | "verified" | "not slower" | "unverified", "message", ...}."""
    def small(ar):
        return next((a["in_loop_us"] for a in ar if a["bytes"] == 8192), None)

    mine = small(allreduce)
    if mode == "nvlink":
        return {"status": "reference", "small_allreduce_us": mine, "message": "nvlink (NCCL's own choice)"}
    ref = small(reference.get("allreduce", [])) if reference else None
    if mine is None or ref is None or ref <= 0:
        return {"status": "unverified", "small_allreduce_us": mine,
                "message": f"{mode}: UNVERIFIED emulation (no nvlink reference run of the 8 KiB all-reduce to "
                           "compare with): these rows may not show that link"}
    x = mine / ref
    ok = x >= LINK_SLOWER_THRESHOLD
    return {"status": "verified" if ok else "not slower", "small_allreduce_us": mine, "reference_us": ref,
            "slower_x": x,
            "message": (f"{mode}: 8 KiB all-reduce {mine:.1f} us vs nvlink {ref:.1f} us ({x:.1f}x): emulation verified"
                        if ok else
                        f"{mode}: 8 KiB all-reduce {mine:.1f} us vs nvlink {ref:.1f} us ({x:.2f}x): NOT slower for "
                        "batch-1 messages here, so these rows do not show that link (one process per GPU "
                        "makes NCCL use the transport; see docs/benchmarks.md)")}


SHAPES: dict[str, dict[str, Any]] = {
    "tiny": dict(arch="llama", vocab_size=512, hidden=128, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=16,
                 intermediate=256, max_position=512),
    "tiny-opt": dict(arch="opt", vocab_size=512, hidden=128, n_layers=4, n_heads=8, n_kv_heads=8, head_dim=16,
                     intermediate=256, max_position=512),
    "llama2-7b": dict(arch="llama", vocab_size=32000, hidden=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                      head_dim=128, intermediate=11008, max_position=4096),
    "llama2-13b": dict(arch="llama", vocab_size=32000, hidden=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                       head_dim=128, intermediate=13824, max_position=4096),
    "llama2-70b": dict(arch="llama", vocab_size=32000, hidden=8192, n_layers=80, n_heads=64, n_kv_heads=8,
                       head_dim=128, intermediate=28672, max_position=4096),
    "opt-6.7b": dict(arch="opt", vocab_size=50272, hidden=4096, n_layers=32, n_heads=32, n_kv_heads=32,
                     head_dim=128, intermediate=16384, max_position=2048),
    "opt-13b": dict(arch="opt", vocab_size=50272, hidden=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                    head_dim=128, intermediate=20480, max_position=2048),
    "opt-30b": dict(arch="opt", vocab_size=50272, hidden=7168, n_layers=48, n_heads=56, n_kv_heads=56,
                    head_dim=128, intermediate=28672, max_position=2048),
    "opt-66b": dict(arch="opt", vocab_size=50272, hidden=9216, n_layers=64, n_heads=72, n_kv_heads=72,
                    head_dim=128, intermediate=36864, max_position=2048),
}


def param_count(name: str) -> int:
    """Number of weights of a named shape, read from the model's declared parameter layout (abstract
    shapes only: no device is touched, so it is usable before the backend starts)."""
    from spd_jax.runtime import build_model_def

    return build_model_def(shape_config(name), 1).param_count()


def memory_fraction(weight_gib_per_device: float, card_gib: float | None, headroom_gib: float = 8.0) -> float | None:
    """The XLA_PYTHON_CLIENT_MEM_FRACTION a benchmark asks for, or None for JAX's default (75%).

    Only where the weights alone fill more than 60% of the card (LLaMA-2-70B at TP 2 on 80 GB cards): then
    the weights plus `headroom_gib` (caches, activations, GEMM workspaces), at most 95%. Not a flat 95%:
    the 5% then left outside JAX's pool was too little for XLA's collective scratch memory with
    LLaMA-2-13B at TP 4 and six compiled configurations on H200 (out of memory in the first all-reduce).
    Without the card's size: 95% above 40 GiB of weights per device."""
    if card_gib is None:
        return 0.95 if weight_gib_per_device > 40.0 else None
    if weight_gib_per_device <= 0.6 * card_gib:
        return None
    return min(0.95, math.ceil(100 * (weight_gib_per_device + headroom_gib) / card_gib) / 100)


def gpu_memory_gib() -> float | None:
    """The smallest GPU's memory (GiB) from nvidia-smi, without starting JAX; None without NVIDIA GPUs."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30).stdout.split()
        return min(float(x) for x in out) / 1024 if out else None
    except (OSError, ValueError, subprocess.SubprocessError):
        return None


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ConfigError(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
    d = dict(SHAPES[name])
    opt = d["arch"] == "opt"
    return ModelConfig(**d, rope=None if opt else RopeConfig(theta=10000.0), tie_embeddings=opt, qkv_bias=opt,
                       o_bias=opt, eos_token_ids=())


def random_params(engine: Engine, seed: int = 0):
    """Random weights created directly in their shards (never materialised on the host).

    One draw per weight, in the weight's own dtype: the device never holds more than the weights plus one
    weight's draw (one program drawing every weight in float32 and casting leaves XLA free to keep float32
    temporaries of many weights at once). The draws are compiled once per (shape, dtype, sharding):
    LLaMA-2-70B has 723 weights of 7 shapes."""
    leaves, treedef = jax.tree.flatten(engine.mdef.abstract)
    shard_leaves = jax.tree.leaves(engine.shardings())
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    draws = {}

    def draw(key, a, sharding):
        kind = (a.shape, a.dtype, sharding)
        if kind not in draws:
            draws[kind] = jax.jit(lambda k: jax.random.normal(k, a.shape, a.dtype) * jnp.asarray(0.02, a.dtype),
                                  out_shardings=sharding)
        return draws[kind](key)

    return treedef.unflatten([draw(k, a, sh) for k, a, sh in zip(keys, leaves, shard_leaves)])


@dataclasses.dataclass
class Timing:
    label: str
    n_spd: int
    ttft_ms: float
    tpot_ms: float  # per output token in the decode loop
    e2e_ms: float
    tokens_per_s: float
    ttft_all: list[float]
    e2e_all: list[float]


def bench_generation_config(new_tokens: int, **fields) -> GenerationConfig:
    """The benchmark's generation: exactly `new_tokens` (no stop at EOS), every other field GenerationConfig's
    default unless given; validated."""
    cfg = GenerationConfig(max_new_tokens=new_tokens, stop_at_eos=False, **fields)
    cfg.validate()
    return cfg


def compile_generators(gens: list[Generator], cfg: GenerationConfig, prompt_len: int, batch: int,
                       threads: int = 1) -> float:
    """Ahead-of-time compile every generator's prefill and decode; returns the wall time (s).

    The first one is compiled alone, so that XLA's GEMM autotuning (shared in-process, and the same
    GEMM shapes for every SPD configuration) runs with the GPU to itself; the rest compile in
    `threads` parallel threads (compilation only: nothing runs on the devices meanwhile)."""
    t0 = time.perf_counter()
    if gens:
        gens[0].precompile(cfg, prompt_len, batch)
    if len(gens) > 1:
        if threads > 1:
            from concurrent.futures import ThreadPoolExecutor

            try:
                with ThreadPoolExecutor(threads) as ex:
                    list(ex.map(lambda g: g.precompile(cfg, prompt_len, batch), gens[1:]))
            except Exception as e:  # an optional speed-up: say so loudly and compile one by one instead
                print(f"!! parallel ahead-of-time compilation failed ({type(e).__name__}: {e}); "
                      "compiling the remaining configurations one at a time", flush=True)
                threads = 1
        if threads <= 1:
            for g in gens[1:]:
                g.precompile(cfg, prompt_len, batch)
    return time.perf_counter() - t0


def time_generation(gen: Generator, cfg: GenerationConfig, batch: int, prompt_len: int, repeats: int,
                    label: str) -> Timing:
    new_tokens = cfg.max_new_tokens
    rng = np.random.RandomState(0)
    prompts = [list(rng.randint(3, gen.cfg.vocab_size, size=prompt_len)) for _ in range(batch)]
    gen.generate(prompts, cfg)  # compile (unless precompiled) + warm up
    ttft, dec, e2e = [], [], []
    for _ in range(repeats):
        r = gen.generate(prompts, cfg)
        e2e.append((r.ttft_s + r.decode_s) * 1e3)  # prefill + decode loop, device-synchronised
        ttft.append(r.ttft_s * 1e3)
        dec.append(r.decode_s * 1e3 / max(new_tokens - 1, 1))
    tpot = float(np.median(dec))
    return Timing(label, gen.plan.n_spd, float(np.median(ttft)), tpot, float(np.median(e2e)),
                  batch * 1e3 / tpot, ttft, e2e)


def read_bandwidth(mesh, mib_per_array: int = 1024, arrays: int = 4, repeats: int = 20) -> dict:
    """Measured HBM read bandwidth per device: the rate at which a kernel can stream bytes it only reads
    (what batch-1 decode does with its weights).

    One jitted reduction over `arrays` distinct bf16 arrays of `mib_per_array` MiB per device, against the
    same over one array: (t_many - t_one) / bytes of the extra arrays, so launch and dispatch costs cancel;
    each time is the fastest of `repeats` calls (host-timed calls only ever come out slower than the
    device). Each device reduces only its own shard (no communication). The arrays are freed on return:
    run it before the weights are placed."""
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    n = mesh.devices.size
    elems = mib_per_array * (1 << 20) // 2
    sharding = NamedSharding(mesh, P("tp", None))
    make = jax.jit(lambda k: jax.random.normal(k, (n, elems), jnp.bfloat16), out_shardings=sharding)
    xs = [make(jax.random.PRNGKey(i)) for i in range(arrays)]
    total = jax.jit(lambda *a: sum(jnp.sum(x.astype(jnp.float32), axis=1) for x in a))

    t_one, t_many = (float(np.min(host_times(total, *a, repeats=repeats))) for a in ((xs[0],), xs))
    del xs
    extra = (arrays - 1) * elems * 2
    gbps = extra / max(t_many - t_one, 1e-9) / 1e9
    return {"read_GBps": gbps, "bytes_per_array": elems * 2, "arrays": arrays, "t_one_ms": t_one * 1e3,
            "t_many_ms": t_many * 1e3}


def decode_budget(weight_bytes: float, read_gbps: float, n_blocks: int, tpot_ms: dict[str, float]) -> dict:
    """Where a decode step's time goes against the weight stream: `bytes_ms` = weight bytes per device /
    measured read bandwidth (the HBM floor); per configuration its ratio to that floor; with a `floor`
    row (no all-reduce), the per-block overhead (floor - bytes_ms) / blocks and, with a `sync` row, the
    all-reduce share (sync - floor)."""
    bytes_ms = weight_bytes / (read_gbps * 1e9) * 1e3
    out = {"bytes_ms": bytes_ms, "x_bytes": {k: v / bytes_ms for k, v in tpot_ms.items()}}
    if "floor" in tpot_ms:
        out["overhead_per_block_us"] = (tpot_ms["floor"] - bytes_ms) * 1e3 / n_blocks
        if "sync" in tpot_ms:
            out["allreduce_ms"] = tpot_ms["sync"] - tpot_ms["floor"]
    return out


def weight_bytes_per_device(mdef) -> float:
    from jax.sharding import PartitionSpec as P

    from spd_jax.runtime import tp_axis_of

    def nbytes(a, s):
        b = float(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
        return b / mdef.tp if tp_axis_of(s) is not None else b

    return sum(jax.tree.leaves(jax.tree.map(nbytes, mdef.abstract, mdef.specs(), is_leaf=lambda x: isinstance(x, P))))
