set -u
mkdir -p /tmp/site && for w in .whl/*.whl; do case "$w" in *cp311*) continue;; esac; python -m zipfile -e "$w" /tmp/site >/dev/null; done
export PYTHONPATH=$PWD:/tmp/site
python -c "import fastapi, uvicorn, jax; print('fastapi', fastapi.__version__, 'uvicorn', uvicorn.__version__, 'jax', jax.__version__, jax.devices())" 2>&1 | tail -2
python make_model.py /tmp/m 2>&1 | tail -1
python launch/infer.py --model /tmp/m --dtype bfloat16 --prompt "The capital of France is" --max-new-tokens 32 --json > $OUT/infer.json 2> $OUT/infer.err; echo "infer rc=$?"
python launch/serve.py --model /tmp/m --dtype bfloat16 --port 8800 --default-max-tokens 32 > $OUT/serve.log 2>&1 &
SP=$!
for i in $(seq 1 240); do curl -s localhost:8800/health >/dev/null && break; kill -0 $SP 2>/dev/null || { echo "server died"; tail -5 $OUT/serve.log; exit 1; }; sleep 1; done; echo "server up after ${i}s"
curl -s localhost:8800/v1/completions -H 'Content-Type: application/json' -d '{"model": "/tmp/m", "prompt": "The capital of France is", "max_tokens": 32, "temperature": 0}' > $OUT/completion.json
python - <<'PY'
import json, os
o = os.environ["OUT"]
a = json.load(open(f"{o}/infer.json"))["results"][0]["text"]; b = json.load(open(f"{o}/completion.json"))["choices"][0]["text"]
print("greedy equal to spd-infer:", a == b, repr(a[:60]), repr(b[:60]))
PY
python scripts/bench_serve.py --url http://127.0.0.1:8800 --model /tmp/m --requests 8 --concurrency 4 --max-tokens 16 > /dev/null   # compile the shapes
python scripts/bench_serve.py --url http://127.0.0.1:8800 --model /tmp/m --requests 64 --concurrency 8 --max-tokens 64 --json $OUT/bench_serve.json
kill -TERM $SP; wait $SP; echo "server exit=$?"
nvidia-smi -L
