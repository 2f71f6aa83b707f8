#!/usr/bin/env python
"""PROBE (not a library feature): a one-shot all-reduce as one Pallas Mosaic GPU kernel that stores each
rank's partial straight into its peers' memory, for the all-reduce issue's <= 15 us target over NVLink.

    python experiments/probe_p2p_allreduce.py [--spawn 2] [--iters 200] [--json OUT]

The kernel (`p2p_allreduce` below), per thread block of 8 x 128-element tiles:
1. store my partial into slot [me] of every peer's mailbox (`plgpu.remote_ref`), signal each peer's
   arrival semaphore (`plgpu.semaphore_signal_parallel`: one release fence);
2. wait for n - 1 arrivals, sum the n slots in float32 in rank order (same bits on every device);
3. signal every peer's departure semaphore and wait for n - 1 (no rank leaves before all have read).
No NVLink multicast. Without the kernel running, this script still traces it (any backend).

It checks, on the `tp` mesh of all devices: the kernel equals the all-gather + float32 rank-order sum
bit for bit, is identical on every device, is within bf16 rounding of NCCL's psum, and a chain of --iters
dependent all-reduces equals the same chain through the reference; then times both in the loop the way
`launch/bench.py` does ((time of 65 dependent calls - time of 1) / 64).

Measured (2x H200, JAX 0.11.2, 2026-11-28; docs/performance.md, 2026-11-28): with one process per GPU the
first call fails in XLA (`ncclGetPeerDevicePointer ... unhandled system error`: JAX 0.11 hands Mosaic GPU
kernels their peers' addresses through NCCL symmetric memory windows, and XLA 0.11 has no NVSHMEM switch);
with one process driving both GPUs it runs, 22-32 us per all-reduce in the loop against psum's 15-23 us,
and the first call of a fresh executable can return a wrong sum on one device. Hence not in the library.
"""

from __future__ import annotations

import argparse
import json
import math

LANES, TILE_ROWS, MAX_BLOCKS, MAX_TILES = 128, 8, 16, 8


def fits(shape) -> bool:
    m = math.prod(shape)
    return m % (TILE_ROWS * LANES) == 0 and m // (TILE_ROWS * LANES) <= MAX_BLOCKS * MAX_TILES


def p2p_allreduce(x, axis_name):
    import jax
    import jax.numpy as jnp
    from jax import lax
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import mosaic_gpu as plgpu

    n = lax.axis_size(axis_name)
    tiles = math.prod(x.shape) // (TILE_ROWS * LANES)
    blocks = max(b for b in range(1, min(MAX_BLOCKS, tiles) + 1) if tiles % b == 0 and tiles // b <= MAX_TILES)
    per_block, rows = tiles // blocks, tiles * TILE_ROWS

    def kernel(x_ref, o_ref, mail_ref, arrived, departed):
        me = lax.axis_index(axis_name)
        first = lax.axis_index("blocks") * (per_block * TILE_ROWS)
        parts = [pl.ds(first + t * TILE_ROWS, TILE_ROWS) for t in range(per_block)]
        peers = [lax.rem(me + k, n) for k in range(1, n)]
        for part in parts:
            mine = x_ref[part, :]
            for p in peers:
                plgpu.remote_ref(mail_ref, p).at[me, part][...] = mine
            mail_ref.at[me, part][...] = mine
        plgpu.semaphore_signal_parallel(*(plgpu.SemaphoreSignal(arrived, device_id=p) for p in peers))
        pl.semaphore_wait(arrived, n - 1)
        for part in parts:
            acc = mail_ref.at[0, part][...].astype(jnp.float32)
            for r in range(1, n):
                acc = acc + mail_ref.at[r, part][...].astype(jnp.float32)
            o_ref[part, :] = acc.astype(o_ref.dtype)
        plgpu.semaphore_signal_parallel(*(plgpu.SemaphoreSignal(departed, device_id=p) for p in peers))
        pl.semaphore_wait(departed, n - 1)

    out, _mailbox = plgpu.kernel(
        kernel,
        out_type=(jax.ShapeDtypeStruct((rows, LANES), x.dtype), jax.ShapeDtypeStruct((n, rows, LANES), x.dtype)),
        grid=(blocks,), grid_names=("blocks",),
        scratch_types=[plgpu.SemaphoreType.REGULAR, plgpu.SemaphoreType.REGULAR],
    )(x.reshape(rows, LANES))
    return out.reshape(x.shape)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--json")
    from spd_jax.distributed import add_distributed_args, maybe_initialize, maybe_spawn

    add_distributed_args(p)
    args = p.parse_args(argv)
    spawned = maybe_spawn(args, __file__, argv)
    if spawned is not None:
        return spawned
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from spd_jax.measure import host_times
    from spd_jax.collectives import gather_sum as reference  # all-gather + float32 sum in rank order
    from spd_jax.distributed import is_main_process, to_host
    from spd_jax.sharding import make_mesh

    maybe_initialize(args)
    n = jax.device_count()
    mesh = make_mesh(n, jax.devices())
    on_gpu = jax.default_backend() == "gpu"

    def sharded(fn):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P("tp"), out_specs=P("tp"), check_vma=False))

    def chain(step, k):
        return sharded(lambda a: jax.lax.fori_loop(0, k, lambda _, c: step(c) * (1.0 / n) + a[0], a[0])[None])

    rows, failed = [], False
    for shape in [(1, 1, 4096), (2, 1, 4096), (1, 1, 5120), (1, 1, 8192), (8, 1, 4096), (32, 1, 4096)]:
        x = jax.device_put(jnp.asarray(np.random.RandomState(sum(shape)).randn(n, *shape), jnp.bfloat16),
                           NamedSharding(mesh, P("tp")))
        ref_fn = sharded(lambda a: reference(a[0], "tp")[None])
        psum_fn = sharded(lambda a: jax.lax.psum(a[0], "tp")[None])
        row = {"shape": list(shape), "bytes": math.prod(shape) * 2, "fits": fits(shape)}
        if not on_gpu:  # no Mosaic GPU here: only check that the kernel traces
            jax.make_jaxpr(jax.shard_map(lambda a: p2p_allreduce(a[0], "tp")[None], mesh=mesh, in_specs=P("tp"),
                                         out_specs=P("tp"), check_vma=False))(x)
            row["traced"] = True
            rows.append(row)
            continue
        try:
            k = to_host(sharded(lambda a: p2p_allreduce(a[0], "tp")[None])(x)).astype(np.float32)
        except Exception as e:  # noqa: BLE001 - the probe reports what the stack says
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:400]}"
            rows.append(row)
            failed = True
            if is_main_process():
                print(json.dumps(row), flush=True)
            break
        ref = to_host(ref_fn(x)).astype(np.float32)
        ps = to_host(psum_fn(x)).astype(np.float32)
        tol = float(np.abs(ref).max()) * 2.0 ** -8 * n
        row.update(equal_to_reference=bool(np.array_equal(k, ref)),
                   same_on_every_device=bool(all(np.array_equal(k[0], k[i]) for i in range(n))),
                   max_abs_vs_psum=float(np.abs(k - ps).max()), tolerance=tol)
        row["chain_equal"] = bool(np.array_equal(to_host(chain(lambda c: p2p_allreduce(c, "tp"), args.iters)(x)),
                                                 to_host(chain(lambda c: reference(c, "tp"), args.iters)(x))))
        for name, step in (("psum", lambda c: jax.lax.psum(c, "tp")), ("p2p", lambda c: p2p_allreduce(c, "tp"))):
            t1, t65 = (float(np.median(host_times(chain(step, kk), x, repeats=20))) for kk in (1, 65))
            row[f"{name}_in_loop_us"] = max(t65 - t1, 0.0) / 64 * 1e6
        row["ok"] = (row["equal_to_reference"] and row["same_on_every_device"] and row["chain_equal"]
                     and row["max_abs_vs_psum"] <= tol)
        failed |= not row["ok"]
        rows.append(row)
        if is_main_process():
            print(json.dumps(row), flush=True)
    if is_main_process():
        verdict = "traced only (no GPU)" if not on_gpu else ("ALL OK" if not failed else "FAILED")
        print(f"p2p probe on {n} x {jax.devices()[0].device_kind}, {jax.process_count()} processes: {verdict}")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"device": jax.devices()[0].device_kind, "n": n, "processes": jax.process_count(),
                           "jax": jax.__version__, "rows": rows}, f, indent=1)
    return 1 if failed else 0


if __name__ == "__main__":
    from spd_jax.cli import run

    run(main)
