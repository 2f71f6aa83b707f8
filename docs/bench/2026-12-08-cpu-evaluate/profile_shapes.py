import time, os, collections
os.environ.setdefault("XLA_FLAGS","--xla_force_host_platform_device_count=8")
from spd_jax.config import RunConfig
from spd_jax.inference import open_session
from spd_jax import evaluation as E
from spd_jax.tasks import DEFAULT_TASKS, load_task
from pathlib import Path
import numpy as np
tasks=[load_task(s, 20, [Path('../shared/data/bigbench')]) for s in DEFAULT_TASKS]
sess=open_session(RunConfig(), default_layout=False)
sc=E.Scorer(sess.engine, sess.params, sess.plan, batch_size=8)
f=sc._nll_fn()
stats=collections.defaultdict(list)
def wrapped(p,t,pad):
    t0=time.time(); out=f(p,t,pad); [np.asarray(o) for o in out]; stats[tuple(t.shape)].append(time.time()-t0); return out
sc._fn=wrapped
for name, fmt, items in tasks:
    seqlens=[]
    E.evaluate_loaded(sc, sess.tokenizer, name, fmt, items, sess.cfg.max_position)
for k,v in sorted(stats.items()): print(k, len(v), "first %.1f rest mean %.2f"%(v[0], np.mean(v[1:]) if len(v)>1 else 0), "total %.1f"%sum(v))
