"""Worker for the multi-process test of `measure.same_on_every_process`: every process makes up its own
microbenchmark timings (a different method fastest in each), agrees, and writes its choice table.

python tests/mp_agree_worker.py OUT_PREFIX [--coordinator ... --num-processes ... --process-id ...]
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("out_prefix")
    from spd_jax.distributed import add_distributed_args, maybe_initialize

    add_distributed_args(p)
    args = p.parse_args()
    maybe_initialize(args)
    import jax

    from spd_jax.measure import same_on_every_process
    from spd_jax.collectives import choice_table

    pid = jax.process_index()
    fast = ["a2a", "gather"][pid % 2]  # what this process alone would choose at 8 KiB
    by = {"psum": 100.0 + pid, "gather": 100.0 + pid, "a2a": 100.0 + pid}
    by[fast] = 50.0 + pid
    rows = [{"bytes": 8192, "in_loop_us": by["psum"], "median_us": 200.0 + pid, "bus_GBps": 0.125,
             "in_loop_us_by_method": by, "fastest": fast}]
    agreed = same_on_every_process(rows)
    with open(f"{args.out_prefix}.{pid}.json", "w") as f:
        json.dump({"process": pid, "table": choice_table(agreed), "rows": agreed, "own": rows}, f)


if __name__ == "__main__":
    main()
