#!/usr/bin/env bash
# Our sync/SPD/floor decode and the transformers TP peer, same shape, same GPUs, one call. RANDOM weights.
# Usage: bash scripts/gpu_bench_peer.sh OUTDIR SHAPE TP [RATIOS] [INTERCONNECT]
set -uo pipefail
out=${1:-/tmp/bench}; shape=${2:-llama2-7b}; tp=${3:-2}; ratios=${4:-0,0.5,1}; ic=${5:-hbw}
mkdir -p "$out"; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
ck=/tmp/peer-$shape
timeout 200 python launch/bench_peer.py --make-checkpoint "$ck" --shape "$shape" 2>&1 | tail -1
if [ "$tp" = 1 ]; then
  timeout 200 python launch/bench_peer.py --checkpoint "$ck" --json "$out/peer-$shape-tp$tp.json" 2>&1 | grep "^#"
else
  timeout 200 torchrun --nproc-per-node "$tp" launch/bench_peer.py --checkpoint "$ck" \
    --json "$out/peer-$shape-tp$tp.json" 2>&1 | grep "^#"
fi
floor=--floor; [ "$tp" = 1 ] && floor=
timeout 360 python launch/bench.py --shape "$shape" --tp "$tp" --spd-ratios "$ratios" $floor --repeats 3 \
  --interconnect "$ic" --peer-json "$out/peer-$shape-tp$tp.json" --json "$out/$shape-tp$tp-$ic.json" 2>&1 \
  | grep -v -i warn
