"""Worker for the multi-process test: logits and greedy tokens of a model at TP 8, written by process 0.

python tests/mp_worker.py MODEL_DIR OUT.npz SPD_BLOCKS [--coordinator ... --num-processes ... --process-id ...]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model")
    p.add_argument("out")
    p.add_argument("spd_blocks")
    p.add_argument("--tp", type=int, default=8)
    from spd_jax.distributed import add_distributed_args, is_main_process, maybe_initialize, to_host
    from spd_jax.plan import SyncPlan

    add_distributed_args(p)
    args = p.parse_args()
    maybe_initialize(args)
    import jax
    import numpy as np

    from spd_jax.config import GenerationConfig, parse_block_spec
    from spd_jax.generate import Generator
    from spd_jax.loading import load_params, open_model
    from spd_jax.runtime import Engine, build_model_def

    lm = open_model(args.model)
    eng = Engine.create(build_model_def(lm.cfg, args.tp))
    params = load_params(eng, lm.source)
    modes = parse_block_spec(args.spd_blocks, lm.cfg.n_layers)
    tokens = np.random.RandomState(0).randint(3, 100, size=(2, 9)).astype(np.int32)
    logits = to_host(eng.logits(params, tokens, plan=SyncPlan.from_flags(modes)))
    gen = Generator(eng, params, SyncPlan.from_flags(modes)).generate([list(tokens[0]), list(tokens[1, 3:])],
                                                 GenerationConfig(max_new_tokens=5, stop_at_eos=False))
    if is_main_process():
        np.savez(args.out, logits=logits, tokens=np.array(gen.tokens), processes=jax.process_count(),
                 device=jax.devices()[0].device_kind)


if __name__ == "__main__":
    main()
