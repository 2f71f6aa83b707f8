#!/usr/bin/env python
"""Profile the on-device decode loop of a random-weight shape and say where the time goes.

Writes a `jax.profiler` trace, then aggregates the device events of the decode loop by name (per XLA op
and per kernel) and prints the top entries per decode step, plus the bandwidth a plain weight-read
GEMV chain reaches in each weight layout (the ceiling our matmuls can hope for). RANDOM weights.

  python scripts/profile_decode.py --shape llama2-7b --tp 1 --out /tmp/prof
  python scripts/profile_decode.py --shape llama2-7b --tp 2 --floor --spawn 2   # one process per GPU

With `--spawn N` every process traces its own GPU and process 0 prints the aggregate of its device, so the
same kernel table can be compared between one process driving all GPUs and one process per GPU.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def busy(intervals):
    """Union length of [start, end) intervals."""
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            total += 0 if cur_e is None else cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + (0 if cur_e is None else cur_e - cur_s)


def aggregate(xplane_path: str, top: int, steps: int, all_devices: bool = False):
    from jax.profiler import ProfileData

    pd = ProfileData.from_file(xplane_path)
    for plane in pd.planes:
        if not plane.name.startswith("/device:GPU"):
            continue
        per_line = collections.defaultdict(lambda: collections.defaultdict(lambda: [0.0, 0]))
        spans = []
        for line in plane.lines:
            kind = "XLA Ops" if "XLA Ops" in line.name else ("XLA Modules" if "Modules" in line.name else
                                                              ("kernels" if "Stream" in line.name else line.name))
            for ev in line.events:
                acc = per_line[kind][ev.name]
                acc[0] += ev.duration_ns
                acc[1] += 1
                if kind == "kernels":
                    spans.append((ev.start_ns, ev.end_ns))
        if spans:
            wall = max(e for _, e in spans) - min(s for s, _ in spans)
            b = busy(spans)
            # The trace covers the whole generate call: its idle time includes the prefill's and the host's
            # work around the decode loop, so divided by the steps it overstates the gaps inside the loop
            # (2026-11-29: inside the loop XLA's kernels run back to back, launched before the last one ends).
            print(f"\n== {plane.name}: kernels span {wall / 1e6:.2f} ms, GPU busy {b / 1e6:.2f} ms "
                  f"({100 * b / wall:.0f}%), idle {(wall - b) / 1e6:.2f} ms in the traced generate call "
                  f"(prefill and host work included; {(wall - b) / 1e6 / steps:.3f} ms per decode step)")
        for kind, table in per_line.items():
            total = sum(v[0] for v in table.values())
            print(f"\n== {plane.name} / {kind}: {len(table)} names, {total / 1e6:.2f} ms total, "
                  f"{total / 1e6 / steps:.3f} ms per decode step, {sum(v[1] for v in table.values()) / steps:.0f} "
                  f"events per step")
            ranked = sorted(table.items(), key=lambda kv: -kv[1][0])
            coll = [kv for kv in ranked[top:] if any(w in kv[0].lower() for w in ("nccl", "all-reduce", "all_reduce",
                                                                                   "allreduce"))]
            for name, (ns, n) in ranked[:top] + coll:
                print(f"  {ns / 1e6 / steps:8.4f} ms/step {n / steps:7.1f}/step  {100 * ns / total:5.1f}%  {name[:110]}")
        if not all_devices:
            break


def gemv_ceiling(hidden: int, inter: int, layers: int):
    """Time chains of x @ W over `layers` weight sets in both layouts; report GB/s of weight reads."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    key = jax.random.PRNGKey(0)
    shapes = [(hidden, 3 * hidden), (hidden, hidden), (hidden, 2 * inter), (inter, hidden)]
    res = {}
    for layout in ("io", "oi"):
        ws = []
        for i in range(layers):
            for j, (a, b) in enumerate(shapes):
                k = jax.random.fold_in(key, i * 10 + j)
                s = (a, b) if layout == "io" else (b, a)
                ws.append((0.02 * jax.random.normal(k, s, jnp.float32)).astype(jnp.bfloat16))
        nbytes = sum(w.size * 2 for w in ws)

        def chain(x, ws):
            for i in range(layers):
                wq, wo, wgu, wd = ws[4 * i:4 * i + 4]
                mm = (lambda v, w: jnp.einsum("bi,io->bo", v, w)) if layout == "io" else \
                     (lambda v, w: jnp.einsum("bi,oi->bo", v, w))
                h = mm(x, wq)[:, :hidden]
                x = x + mm(h, wo)
                gu = mm(x, wgu)
                x = x + mm(jax.nn.silu(gu[:, :inter]) * gu[:, inter:], wd)
            return x

        f = jax.jit(chain)
        x = jnp.ones((1, hidden), jnp.bfloat16)
        f(x, ws).block_until_ready()
        ts = []
        for _ in range(20):
            t0 = time.perf_counter()
            f(x, ws).block_until_ready()
            ts.append(time.perf_counter() - t0)
        t = float(np.median(ts))
        res[layout] = (t * 1e3, nbytes / t / 1e9)
        print(f"GEMV chain, weights [{'in,out' if layout == 'io' else 'out,in'}]: {nbytes / 1e9:.2f} GB in "
              f"{t * 1e3:.3f} ms = {nbytes / t / 1e9:.0f} GB/s")
        del ws
    return res


def main():
    from spd_jax.config import ATTENTION_KERNEL_CHOICES

    p = argparse.ArgumentParser()
    p.add_argument("--shape", default="llama2-7b")
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default="/tmp/prof")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--spd", action="store_true", help="all blocks in SPD mode")
    p.add_argument("--floor", action="store_true", help="no all-reduce at all (compute-only bound)")
    p.add_argument("--decode-chunk", type=int, default=8)
    p.add_argument("--fused-projections", action=argparse.BooleanOptionalAction, default=True,
                   help="on by default, as in launch/bench.py")
    p.add_argument("--fold-norms", action=argparse.BooleanOptionalAction, default=None,
                   help="on by default for RMSNorm shapes, as in launch/bench.py")
    p.add_argument("--attention-kernel", choices=ATTENTION_KERNEL_CHOICES, default="auto",
                   help="decode attention: XLA's masked attention, the Pallas kernel (spd_jax/kernels.py), or auto "
                        "(the kernel on CUDA GPUs; the default)")
    p.add_argument("--gemv", action="store_true", help="also time plain GEMV chains (bandwidth ceiling)")
    p.add_argument("--hlo", action="store_true",
                   help="dump the optimised HLO of the profiled decode loop (XLA's dump, same compile as the "
                        "profile, so kernel names match) to OUT/hlo/")
    p.add_argument("--interconnect", choices=["nvlink", "pcie", "net", "hbw", "lbw"], default="nvlink",
                   help="the NCCL variables of launch/bench.py --interconnect")
    p.add_argument("--all-devices", action="store_true", help="print every local GPU's table, not only the first")
    from spd_jax.distributed import add_distributed_args, maybe_initialize, maybe_spawn

    add_distributed_args(p)
    args = p.parse_args()
    spawned = maybe_spawn(args, os.path.abspath(__file__))
    if spawned is not None:
        return spawned
    if args.hlo:  # before JAX starts: XLA reads its flags once
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + f" --xla_dump_to={os.path.join(args.out, 'hlo')}"
                                   " --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*decode.*").strip()
    from spd_jax.bench import set_interconnect

    set_interconnect(args.interconnect)
    from spd_jax.cli import ensure_devices

    ensure_devices(args)
    import jax
    import numpy as np

    maybe_initialize(args)
    from spd_jax.bench import random_params, shape_config, weight_bytes_per_device
    from spd_jax.config import GenerationConfig
    from spd_jax.generate import Generator
    from spd_jax.runtime import Engine, build_model_def

    os.makedirs(args.out, exist_ok=True)
    cfg = shape_config(args.shape)
    mdef = build_model_def(cfg, args.tp, "bfloat16")
    engine = Engine.create(mdef)
    params = random_params(engine)
    from spd_jax.runtime import inference_layout, layout_choice

    args.fused_projections, args.fold_norms = layout_choice(cfg, args.fused_projections, args.fold_norms, True)
    from spd_jax.kernels import resolve_attention_kernel

    args.attention_kernel = resolve_attention_kernel(args.attention_kernel, cfg.head_dim)  # what runs
    engine, params = inference_layout(engine, params, fused=args.fused_projections, fold=args.fold_norms)
    from spd_jax.plan import SyncPlan

    L = cfg.n_layers
    plan = SyncPlan.floor(L) if args.floor else SyncPlan.all_spd(L) if args.spd else SyncPlan.sync(L)
    gen = Generator(engine, params, plan)
    gcfg = GenerationConfig(max_new_tokens=args.new_tokens, stop_at_eos=False, decode_chunk=args.decode_chunk,
                            attention_kernel=args.attention_kernel)
    prompt = [list(np.random.RandomState(0).randint(3, cfg.vocab_size, size=128))]
    gen.generate(prompt, gcfg)
    r = gen.generate(prompt, gcfg)
    steps = args.new_tokens - 1
    wb = weight_bytes_per_device(mdef)
    layout = (f"one process per device ({jax.process_count()} processes)" if jax.process_count() > 1
              else f"one process driving {args.tp} device(s)")
    main_proc = jax.process_index() == 0
    say = print if main_proc else (lambda *a, **k: None)
    say(f"# {layout}")
    say(f"# {args.shape} tp={args.tp} spd={args.spd} floor={args.floor} fused={args.fused_projections} fold={args.fold_norms} attention={args.attention_kernel} chunk={args.decode_chunk} on {jax.devices()[0].device_kind}: "
          f"tpot {r.decode_s * 1e3 / steps:.3f} ms, weights/device {wb / 1e9:.2f} GB "
          f"-> {wb / (r.decode_s / steps) / 1e9:.0f} GB/s effective")
    if args.hlo:
        dumped = sorted(glob.glob(os.path.join(args.out, "hlo", "*decode*after_optimizations.txt")))
        say(f"optimised HLO of the decode loop: {dumped}")
    import tempfile

    trace_dir = tempfile.mkdtemp(prefix=f"trace-p{jax.process_index()}-", dir=args.out)  # fresh per run: never re-read an old trace
    with jax.profiler.trace(trace_dir):
        gen.generate(prompt, gcfg)
    paths = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if main_proc:
        aggregate(paths[0], args.top, steps, all_devices=args.all_devices)
    if args.gemv and main_proc:
        gemv_ceiling(cfg.hidden, cfg.intermediate // args.tp, cfg.n_layers)
    return 0


if __name__ == "__main__":
    from spd_jax.cli import run

    run(main)
