"""Latency benchmark of SPD vs sync, side by side in one process. Weights are RANDOM (speed only).

Examples:
  python launch/bench.py --shape tiny --tp 4                       # CPU smoke run (simulated devices)
  python launch/bench.py --shape llama2-7b --tp 2 --spawn 2 --floor --json nvlink.json   # 2 GPUs, NVLink
  python launch/bench.py --shape llama2-7b --tp 2 --spawn 2 --interconnect net   # NCCL sockets over loopback TCP
  python launch/bench.py --shape llama2-7b --tp 2 --spawn 2 --interconnect pcie  # NCCL without P2P (host memory)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from spd_jax.config import ATTENTION_KERNEL_CHOICES, KERNEL_TUNE_KEYS, SHADOW_ALLREDUCE, GenerationConfig

GEN = GenerationConfig()  # the decode settings' defaults: the same as every other command's


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--spd-ratios", default="0,0.25,0.5,0.75,1")
    p.add_argument("--spd-plan", help="plan.json: benchmark its blocks instead of the ratios' last blocks")
    p.add_argument("--floor", action="store_true", help="also run with every all-reduce removed")
    p.add_argument("--interconnect", choices=["nvlink", "pcie", "net", "hbw", "lbw"], default="nvlink",
                   help="nvlink: NCCL's choice; pcie: no P2P, through host memory; net: NCCL sockets over "
                        "loopback TCP (hbw/lbw: old names of nvlink/net). See spd_jax.bench.INTERCONNECT_ENV")
    p.add_argument("--link-reference", metavar="JSON",
                   help="a bench JSON of the same shape/TP under nvlink: checks that this mode's small all-reduces "
                        "really are slower, and says so in the output")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    p.add_argument("--fused-projections", action=argparse.BooleanOptionalAction, default=None,
                   help="q/k/v and gate/up as single GEMMs (runtime.fuse_projections); on unless --no-fused-projections")
    p.add_argument("--fold-norms", action=argparse.BooleanOptionalAction, default=None,
                   help="RMSNorm weights folded into the projections, 1/rms after them (runtime.fold_norms); on for "
                        "RMSNorm shapes unless --no-fold-norms")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-chunk", type=int, default=GEN.decode_chunk, help="decode steps between stop-condition checks")
    p.add_argument("--attend-window", type=int, default=GEN.attend_window,
                   help="decode attends over the filled cache in windows doubling from this (0: the whole cache)")
    p.add_argument("--attention-kernel", choices=ATTENTION_KERNEL_CHOICES, default=GEN.attention_kernel,
                   help="decode attention: masked attention in JAX, our Pallas kernel (spd_jax.kernels), or auto: the "
                        "kernel on CUDA GPUs where it applies (the default)")
    p.add_argument("--no-shadow-row", action="store_true",
                   help="batch-1 decode on one row (each product padded to two) instead of two identical rows")
    p.add_argument("--shadow-allreduce", choices=SHADOW_ALLREDUCE, default=GEN.shadow_allreduce,
                   help="developer knob: the shadow row's all-reduces carry the first row (default: the message of "
                        "one row) or both (docs/performance.md, \"All-reduce\")")
    p.add_argument("--attention-tune", default=GEN.attention_tune, metavar="KEY=INT,...",
                   help="developer knob: the attention kernel's Triton settings (keys: " + ", ".join(KERNEL_TUNE_KEYS)
                        + "; e.g. block_k=256,num_warps=8)")
    p.add_argument("--compile-threads", type=int, default=4,
                   help="compile the SPD configurations in this many threads (after the first, alone)")
    p.add_argument("--compile-cache", metavar="DIR",
                   help="persistent XLA compilation cache: a second run of the same shapes (e.g. --interconnect "
                        "lbw after hbw) reuses the compiled programs instead of compiling again")
    p.add_argument("--peer-json", action="append", default=[],
                   help="a launch/bench_peer.py result from the same machine: report ratios to it (repeatable: "
                        "e.g. the eager and the compiled peer)")
    p.add_argument("--allreduce-methods", default="psum",
                   help="comma list of all-reduce implementations to run every configuration with (psum, gather, "
                        "a2a, auto; collectives.py); each is timed against its own sync row, and the microbenchmark "
                        "measures each at every size: the choice table. 'auto' measures psum, gather and a2a first, at "
                        "--allreduce-sizes and at this run's own decode and prefill message sizes, and runs each message "
                        "with the fastest at the nearest measured size (the table is in the JSON: allreduce_table)")
    p.add_argument("--allreduce-max-bytes", type=int, default=None,
                   help="messages above this size use psum whatever the method (prefill); default 256 KiB")
    p.add_argument("--allreduce-sizes", default="8192,1048576,67108864",
                   help="message sizes (bytes) of the all-reduce microbenchmark, comma-separated")
    p.add_argument("--time-exchange", action="store_true",
                   help="the microbenchmark also times ONE exchange of each message (a ppermute to the next rank): "
                        "what one NCCL point-to-point operation costs on this link, beside the all-reduces")
    p.add_argument("--bandwidth-mib", type=int, default=None,
                   help="MiB per array of the HBM read-bandwidth measurement (4 arrays per device; 0 = skip it). "
                        "Default: 1024 on GPUs, skipped elsewhere. The per-block decode budget needs it")
    p.add_argument("--json", help="write the results as JSON to this file ('-' for stdout)")
    p.add_argument("--plot", help="write a PNG of latency vs SPD ratio")
    from spd_jax.distributed import add_distributed_args

    add_distributed_args(p)
    return p.parse_args(argv)


PEER_FIELDS = ("tp", "device", "ttft_ms", "tpot_ms", "e2e_ms")


def generation_config(args):
    """The benchmark's GenerationConfig from its flags (one place; validated)."""
    from spd_jax.bench import bench_generation_config

    return bench_generation_config(args.new_tokens, decode_chunk=args.decode_chunk, attend_window=args.attend_window,
                                   shadow_row=not args.no_shadow_row, attention_kernel=args.attention_kernel,
                                   shadow_allreduce=args.shadow_allreduce, attention_tune=args.attention_tune)


def _read_json(path: str, flag: str) -> dict:
    from spd_jax.config import ConfigError

    p = Path(path).expanduser()
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{flag} {p}: file not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{flag} {p} is not a readable JSON file: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{flag} {p}: expected a JSON object, got {type(data).__name__}")
    return data


def check_inputs(args) -> None:
    """Every input file and output path, and every list flag, checked before the first compile: a typo must
    not cost a GPU run. Parsed lists are kept on `args` (spd_ratio_list, allreduce_size_list, method_list)."""
    from spd_jax.bench import SHAPES
    from spd_jax.cli import check_output_path, parse_list
    from spd_jax.collectives import AUTO, METHODS
    from spd_jax.config import ConfigError, parse_kernel_tune

    parse_kernel_tune(args.attention_tune, "--attention-tune")  # first, so the error names the flag
    generation_config(args)  # --decode-chunk, --attend-window, ... (a ConfigError names the field)

    if args.shape not in SHAPES:
        raise ConfigError(f"--shape {args.shape!r} is not a known shape; known: {', '.join(sorted(SHAPES))}")
    for name in ("tp", "batch", "prompt_len", "new_tokens", "repeats", "decode_chunk", "compile_threads"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    args.spd_ratio_list = parse_list(args.spd_ratios, float, "--spd-ratios", 0.0, 1.0)
    args.allreduce_size_list = parse_list(args.allreduce_sizes, int, "--allreduce-sizes", 1)
    args.method_list = [m.strip() for m in args.allreduce_methods.split(",") if m.strip()]
    bad = [m for m in args.method_list if m not in METHODS + (AUTO,)]
    if bad or not args.method_list:
        raise ConfigError(f"--allreduce-methods: unknown {bad}; known: {', '.join(METHODS + (AUTO,))}")
    if AUTO in args.method_list and args.tp < 2:
        raise ConfigError("--allreduce-methods auto needs --tp >= 2 (it measures the all-reduces first)")
    if args.spd_plan:
        from spd_jax.plan import load_plan

        load_plan(args.spd_plan)
    if args.link_reference:
        ref = _read_json(args.link_reference, "--link-reference")
        if not isinstance(ref.get("allreduce"), list) or "shape" not in ref or "tp" not in ref:
            raise ConfigError(f"--link-reference {args.link_reference}: not a launch/bench.py --json result (no "
                              "'shape', 'tp' and 'allreduce' fields)")
        if (ref["shape"], ref["tp"]) != (args.shape, args.tp):
            raise ConfigError(f"--link-reference {args.link_reference} was measured for {ref['shape']} at TP "
                              f"{ref['tp']}, this run is {args.shape} at TP {args.tp}")
    for f in args.peer_json:
        peer = _read_json(f, "--peer-json")
        missing = [k for k in PEER_FIELDS if k not in peer]
        if missing:
            raise ConfigError(f"--peer-json {f}: not a launch/bench_peer.py result (missing {', '.join(missing)})")
    check_output_path(args.json, "--json")
    check_output_path(args.plot, "--plot")


class Phases:
    """Progress on stderr, and where the wall time went (the JSON's "phases_s")."""

    def __init__(self):
        self.marks, self.s = [time.perf_counter()], {}

    def __call__(self, name: str) -> None:
        self.marks.append(time.perf_counter())
        self.s[name] = round(self.marks[-1] - self.marks[-2], 2)
        print(f"[bench +{self.marks[-1] - self.marks[0]:7.1f} s] {name} ({self.s[name]:.1f} s)", file=sys.stderr,
              flush=True)


def main(argv=None) -> int:
    """The steps of a benchmark run: check the inputs, set up the link and devices, build the model with random
    weights, list the configurations, compile and time them, then report."""
    args = parse_args(argv)
    check_inputs(args)
    from spd_jax.bench import shape_config
    from spd_jax.distributed import maybe_spawn

    spawned = maybe_spawn(args, __file__, argv, tp=args.tp, model_cfg=shape_config(args.shape))
    if spawned is not None:
        return spawned
    phase = Phases()
    prepare_environment(args)
    engine, params, hbm = build_model(args, phase)
    configs, ar, table, sizes, measured = configurations(args, engine, phase)
    rows, ar, gens, compile_s = time_configurations(args, engine, params, configs, ar, sizes, measured, phase)
    result = tabulate(args, engine, configs, rows, ar, table, hbm, compile_s, phase.s)
    from spd_jax.distributed import is_main_process

    if is_main_process():
        report(args, result, len(gens), table)
    return 0


def prepare_environment(args) -> None:
    """Before JAX's backend (and NCCL) start: the interconnect's NCCL variables, 95% of GPU memory for JAX only for
    shapes that need it (an explicit XLA_PYTHON_CLIENT_MEM_FRACTION always wins), the devices, the compile cache."""
    from spd_jax.bench import SHAPES, canonical_interconnect, gpu_memory_gib, memory_fraction, param_count, set_interconnect

    args.interconnect = canonical_interconnect(args.interconnect)
    set_interconnect(args.interconnect)
    if args.shape in SHAPES:
        frac = memory_fraction(param_count(args.shape) * 2 / args.tp / 2**30, gpu_memory_gib())
        if frac is not None:
            os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", str(frac))
    from spd_jax.cli import ensure_devices

    ensure_devices(args)
    import jax

    if args.compile_cache:
        jax.config.update("jax_compilation_cache_dir", args.compile_cache)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def build_model(args, phase):
    """(engine, random weights in the inference layout, HBM read bandwidth or None); resolves the layout and
    attention kernel on `args` (what runs is what the JSON records)."""
    import jax

    from spd_jax.bench import random_params, read_bandwidth, shape_config
    from spd_jax.distributed import maybe_initialize
    from spd_jax.kernels import resolve_attention_kernel
    from spd_jax.runtime import Engine, build_model_def, inference_layout, layout_choice

    maybe_initialize(args)
    cfg = shape_config(args.shape)
    engine = Engine.create(build_model_def(cfg, args.tp, args.dtype))
    phase("start-up (imports, devices)")
    if args.bandwidth_mib is None:
        args.bandwidth_mib = 1024 if jax.default_backend() == "gpu" else 0
    hbm = read_bandwidth(engine.mesh, args.bandwidth_mib) if args.bandwidth_mib > 0 else None
    phase("HBM read bandwidth")
    params = random_params(engine)
    jax.block_until_ready(params)
    phase("random weights in their shards")
    args.fused_projections, args.fold_norms = layout_choice(cfg, args.fused_projections, args.fold_norms, True)
    args.attention_kernel = resolve_attention_kernel(args.attention_kernel, cfg.head_dim)
    engine, params = inference_layout(engine, params, fused=args.fused_projections, fold=args.fold_norms)
    return engine, params, hbm


def configurations(args, engine, phase):
    """(label, SyncPlan, all-reduce method) for every ratio or plan row and method (+ the floor); for `auto`, the
    choice table measured first at this run's own message sizes. Returns (configs, microbenchmark or None, table,
    sizes, methods measured)."""
    from spd_jax.measure import allreduce_microbench
    from spd_jax.collectives import AUTO, DEFAULT_MAX_BYTES, METHODS, AllReduce, choice_table
    from spd_jax.plan import SyncPlan, load_plan

    cfg = engine.mdef.cfg
    L = cfg.n_layers
    if args.allreduce_max_bytes is None:
        args.allreduce_max_bytes = DEFAULT_MAX_BYTES
    methods, sizes = args.method_list, tuple(args.allreduce_size_list)
    measured = [m for m in methods if m != AUTO]
    ar, table = None, ()
    if AUTO in methods:  # the choice table of this link, measured before the configurations that use it
        from spd_jax.generate import allreduce_message_bytes

        # ... at the sizes this run's messages have, so that no message takes a neighbouring size's choice
        sizes = tuple(sorted(set(sizes) | set(allreduce_message_bytes(cfg.hidden, args.dtype, args.batch,
                                                                       args.prompt_len).values())))
        measured = list(dict.fromkeys(measured + list(METHODS)))
        ar = allreduce_microbench(engine.mesh, sizes, methods=tuple(measured), time_exchange=args.time_exchange)
        table = choice_table(ar)
        phase("all-reduce microbenchmark (for auto)")

    def how(m):
        return AllReduce(AUTO, table=table) if m == AUTO else AllReduce(m, args.allreduce_max_bytes)

    if args.spd_plan:
        base = [("r=0.00", SyncPlan.sync(L)), ("plan", SyncPlan.from_plan(load_plan(args.spd_plan), L,
                                                                           where=args.spd_plan))]
    else:
        base = [(f"r={r:.2f}", SyncPlan.from_ratio(L, r)) for r in args.spd_ratio_list]
    configs = []
    for m in methods:
        suffix = "" if m == "psum" else f"/{m}"
        configs += [(label + suffix, plan.using(how(m)), m) for label, plan in base]
    if args.floor:
        configs.append(("floor", SyncPlan.floor(L), "none"))
    return configs, ar, table, sizes, measured


def time_configurations(args, engine, params, configs, ar, sizes, measured, phase):
    """Compile every configuration, time each, then (unless `auto` did already) the all-reduce microbenchmark.
    Returns (rows, microbenchmark, generators, compile seconds)."""
    from spd_jax.bench import compile_generators, time_generation
    from spd_jax.measure import allreduce_microbench
    from spd_jax.generate import Generator

    gens = [Generator(engine, params, plan) for _, plan, _ in configs]
    gcfg = generation_config(args)
    compile_s = compile_generators(gens, gcfg, args.prompt_len, args.batch, args.compile_threads)
    phase(f"compile {len(gens)} configurations")
    rows = []
    for (label, _, _), g in zip(configs, gens):
        rows.append(time_generation(g, gcfg, args.batch, args.prompt_len, args.repeats, label))
        phase(f"time {label}")
    if ar is None:
        ar = (allreduce_microbench(engine.mesh, sizes, methods=tuple(measured) if measured != ["psum"] else (),
                                   time_exchange=args.time_exchange)
              if args.tp > 1 else [])
        phase("all-reduce microbenchmark")
    return rows, ar, gens, compile_s


def tabulate(args, engine, configs, rows, ar, table, hbm, compile_s, phases) -> dict:
    """The run's JSON: its settings, the environment, the link check, the decode budget and every row with its
    ratios to the sync row of the same all-reduce method, to NCCL's sync row and the share of all-reduce removed."""
    import jax

    from spd_jax.bench import NCCL_KEYS, decode_budget, link_check, weight_bytes_per_device

    method_of = {label: m for label, _, m in configs}
    sync_of = {m: next((r for r in rows if method_of[r.label] == m and r.n_spd == 0), rows[0])
               for m in args.method_list}
    sync = rows[0]
    floor = next((r for r in rows if r.label == "floor"), None)
    ref = _read_json(args.link_reference, "--link-reference") if args.link_reference else None
    link = link_check(args.interconnect, ar, ref) if args.tp > 1 else {"status": "n/a", "message": "TP 1"}
    wbytes = weight_bytes_per_device(engine.mdef)
    budget = None
    if hbm is not None:
        named = {r.label: r.tpot_ms for r in rows}
        named["sync"] = sync.tpot_ms
        budget = decode_budget(wbytes, hbm["read_GBps"], engine.mdef.cfg.n_layers, named)
    return {
        "shape": args.shape, "tp": args.tp, "batch": args.batch, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "dtype": args.dtype, "decode_chunk": args.decode_chunk,
        "attend_window": args.attend_window, "shadow_row": not args.no_shadow_row,
        "shadow_allreduce": args.shadow_allreduce, "attention_tune": args.attention_tune,
        "attention_kernel": args.attention_kernel,
        "fused_projections": args.fused_projections, "fold_norms": args.fold_norms, "compile_s": compile_s, "interconnect": args.interconnect,
        "mem_fraction": os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION"),
        "nccl_env": {k: os.environ.get(k) for k in NCCL_KEYS}, "random_weights": True,
        "nccl_tuning": {k: v for k, v in os.environ.items()  # what the user set beyond the link mode (ALGO, PROTO...)
                        if k.startswith("NCCL_") and k not in NCCL_KEYS and not k.startswith("NCCL_DEBUG")},
        "device": jax.devices()[0].device_kind, "n_devices": jax.device_count(), "jax": jax.__version__,
        "n_processes": jax.process_count(), "link_check": link,
        "weight_bytes_per_device": wbytes, "allreduce": ar, "hbm": hbm, "decode_budget": budget, "phases_s": phases,
        "allreduce_methods": args.method_list, "allreduce_max_bytes": args.allreduce_max_bytes,
        "allreduce_table": [list(e) for e in table] or None,
        "rows": [{**r.__dict__, "allreduce_method": method_of[r.label],
                  "speedup_e2e_vs_sync": (s := sync_of.get(method_of[r.label], sync)).e2e_ms / r.e2e_ms,
                  "speedup_tpot_vs_sync": s.tpot_ms / r.tpot_ms,
                  "vs_psum_sync_e2e": sync.e2e_ms / r.e2e_ms,
                  "allreduce_time_removed": ((s.tpot_ms - r.tpot_ms) / (s.tpot_ms - floor.tpot_ms)
                                             if floor and s.tpot_ms > floor.tpot_ms else None)}
                 for r in rows],
    }


def report(args, result: dict, n_configs: int, table) -> None:
    """The table on stdout, the ratios to the peers, the JSON and the plot (process 0 only)."""
    import jax

    from spd_jax.collectives import AUTO_MARGIN

    procs = jax.process_count()
    print(f"# {args.shape} tp={args.tp} batch={args.batch} {args.prompt_len}in/{args.new_tokens}out {args.dtype} "
          f"{args.interconnect} on {jax.device_count()}x{jax.devices()[0].device_kind}, "
          f"{'one process per device' if procs == jax.device_count() and procs > 1 else f'{procs} process(es)'} "
          f"(RANDOM weights)")
    print(f"# link: {result['link_check']['message']}")
    print("# e2e x / tpot x: against the sync row of the same all-reduce method; vs psum: against NCCL's sync row")
    print(f"{'config':12s} {'spd':>4s} {'ttft ms':>9s} {'tpot ms':>9s} {'e2e ms':>9s} {'tok/s':>8s} "
          f"{'e2e x':>6s} {'tpot x':>6s} {'vs psum':>7s} {'AR removed':>10s}")
    for r in result["rows"]:
        rem = r["allreduce_time_removed"]
        print(f"{r['label']:12s} {r['n_spd']:4d} {r['ttft_ms']:9.2f} {r['tpot_ms']:9.3f} {r['e2e_ms']:9.1f} "
              f"{r['tokens_per_s']:8.1f} {r['speedup_e2e_vs_sync']:6.3f} {r['speedup_tpot_vs_sync']:6.3f} "
              f"{r['vs_psum_sync_e2e']:7.3f} {'' if rem is None else f'{100 * rem:.0f}%':>10s}")
    budget, hbm = result["decode_budget"], result["hbm"]
    if budget is not None:
        line = (f"# HBM read {hbm['read_GBps']:.0f} GB/s per device (measured): weight stream {budget['bytes_ms']:.3f} "
                f"ms/token; sync {budget['x_bytes']['sync']:.2f}x that")
        if "floor" in budget["x_bytes"]:
            line += (f", floor {budget['x_bytes']['floor']:.2f}x; per-block overhead "
                     f"{budget['overhead_per_block_us']:.1f} us")
        print(line)
    print(f"compiled {n_configs} configurations in {result['compile_s']:.1f} s ({args.compile_threads} threads)")
    for a in result["allreduce"]:
        print(f"all-reduce {a['bytes']:>10d} B: in loop {a['in_loop_us']:9.1f} us (bus {a['bus_GBps']:.2f} GB/s), "
              f"one call from the host {a['median_us']:9.1f} us")
        if "in_loop_us_by_method" in a:
            print("    in loop by method: " + ", ".join(f"{m} {us:.1f} us" for m, us in a["in_loop_us_by_method"].items())
                  + f" -> fastest: {a['fastest']}")
        if "one_exchange_us" in a:
            print(f"    one point-to-point exchange (ppermute) of the same message: "
                  f"{a['one_exchange_us']:.1f} us")
    if table:
        print("auto all-reduce choice table (measured above; psum kept unless another method is "
              f"{AUTO_MARGIN:.0%} faster): " + ", ".join(f"{b} B -> {m}" for b, m in table))
    if args.peer_json:
        compare_to_peers(result, [_read_json(f, "--peer-json") for f in args.peer_json])
    if args.json:
        from spd_jax.measure import provenance

        result["provenance"] = provenance()
        text = json.dumps(result, indent=2)
        print(text) if args.json == "-" else Path(args.json).write_text(text)
    if args.plot:
        plot(args, result)


def compare_to_peers(result: dict, peers: list[dict]) -> None:
    """Each row's decode and end-to-end ratio to each peer's run (recorded in the rows and printed)."""
    result["peers"] = peers
    for peer in peers:
        name = f"TP {peer['tp']} {peer.get('config', 'eager, dynamic cache')}"
        print(f"peer: transformers {peer.get('transformers')} {name} on {peer['device']}: ttft "
              f"{peer['ttft_ms']:.2f} ms, tpot {peer['tpot_ms']:.3f} ms, e2e {peer['e2e_ms']:.1f} ms")
        for r in result["rows"]:
            r.setdefault("vs_peers", {})[name] = {"tpot_x": peer["tpot_ms"] / r["tpot_ms"],
                                                  "e2e_x": peer["e2e_ms"] / r["e2e_ms"]}
            print(f"  {r['label']:8s} vs that peer: decode {peer['tpot_ms'] / r['tpot_ms']:.2f}x faster, "
                  f"e2e {peer['e2e_ms'] / r['e2e_ms']:.2f}x faster")


def plot(args, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for m in result["allreduce_methods"]:
        pts = [r for r in result["rows"] if r["label"].startswith("r=") and r["allreduce_method"] == m]
        ax.plot([float(r["label"][2:].split("/")[0]) * 100 for r in pts], [r["e2e_ms"] for r in pts],
                marker="o", label=f"e2e ({m})")
    floor = next((r for r in result["rows"] if r["label"] == "floor"), None)
    if floor is not None:
        ax.axhline(floor["e2e_ms"], ls="--", c="gray", label="no all-reduce (floor)")
    ax.set(xlabel="SPD ratio (%)", ylabel="request latency (ms)",
           title=f"{args.shape} TP{args.tp} {args.interconnect} ({result['device']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)


def entry() -> None:
    from spd_jax.cli import run

    run(main)


if __name__ == "__main__":
    entry()
