#!/usr/bin/env bash
# Benchmark LLaMA/OPT shapes on the GPUs of one host. RANDOM weights (speed only).
# Usage: bash scripts/gpu_bench.sh OUTDIR "SHAPES" "TPS" "INTERCONNECTS" RATIOS
#   e.g. bash scripts/gpu_bench.sh out "llama2-7b llama2-13b" "1 2 4" "hbw lbw" 0,0.25,0.5,0.75,1
set -uo pipefail
out=${1:-/tmp/bench}; shapes=${2:-llama2-7b}; tps=${3:-"1 2"}; ics=${4:-"hbw lbw"}; ratios=${5:-0,0.5,1}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import jax; print('jax', jax.__version__, jax.devices())"
for s in $shapes; do
  for tp in $tps; do
    if [ "$tp" = 1 ]; then
      timeout 300 python launch/bench.py --shape "$s" --tp 1 --spd-ratios 0 --repeats 3 --compile-cache /tmp/xla-cache \
        --json "$out/$s-tp1.json" 2>&1 | grep -v -i warn
      continue
    fi
    for ic in $ics; do
      timeout 400 python launch/bench.py --shape "$s" --tp "$tp" --spd-ratios "$ratios" --floor --repeats 3 \
        --interconnect "$ic" --compile-cache /tmp/xla-cache --json "$out/$s-tp$tp-$ic.json" 2>&1 | grep -v -i warn
    done
  done
done
