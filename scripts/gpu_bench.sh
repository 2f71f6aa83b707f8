#!/usr/bin/env bash
# One device call: LLaMA-2 shapes at TP 1/2, HBW and LBW, SPD ratios + floor. RANDOM weights.
# Usage on a 2-GPU machine: bash scripts/gpu_bench.sh OUTDIR "shapes" "ratios"
set -uo pipefail
out=${1:-/tmp/bench}; shapes=${2:-llama2-7b}; ratios=${3:-0,0.5,1}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=0.92
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import jax; print('jax', jax.__version__, jax.devices())"
for s in $shapes; do
  python launch/bench.py --shape "$s" --tp 1 --spd-ratios 0 --floor --repeats 3 --json "$out/$s-tp1.json" 2>&1 | grep -v -i warn
  for ic in hbw lbw; do
    python launch/bench.py --shape "$s" --tp 2 --spd-ratios "$ratios" --floor --repeats 3 --interconnect $ic \
      --json "$out/$s-tp2-$ic.json" 2>&1 | grep -v -i warn
  done
done
