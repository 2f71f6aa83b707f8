import time, sys
t0=time.time()
import os
os.environ.setdefault("XLA_FLAGS","--xla_force_host_platform_device_count=8")
from spd_jax.config import RunConfig
from spd_jax.inference import open_session
from spd_jax.evaluation import Scorer, stream_perplexity, evaluate_loaded
from spd_jax.data import text_tokens
from spd_jax.tasks import DEFAULT_TASKS, load_task
from pathlib import Path
print("imports", round(time.time()-t0,1), flush=True); t=time.time()
tasks=[load_task(s, 20, [Path('../shared/data/bigbench')]) for s in DEFAULT_TASKS]
print("tasks", round(time.time()-t,1)); t=time.time()
sess=open_session(RunConfig(), default_layout=False)
print("model opened", round(time.time()-t,1)); t=time.time()
sc=Scorer(sess.engine, sess.params, sess.plan, batch_size=8)
stream=text_tokens("wiki", sess.tokenizer, "eval")[:16384]
print("tokens", round(time.time()-t,1)); t=time.time()
pp=stream_perplexity(sc, stream, 256)
print("ppl", round(time.time()-t,1), pp.value); t=time.time()
import collections
for name, fmt, items in tasks:
    lens=collections.Counter()
    r=evaluate_loaded(sc, sess.tokenizer, name, fmt, items, sess.cfg.max_position)
    print(name, round(time.time()-t,1), len(items), sum(len(i.choices) for i in items) if fmt=="mc" else "", flush=True); t=time.time()
