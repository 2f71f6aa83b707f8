#!/usr/bin/env bash
# A/B of XLA GPU flags on one shape (same machine, same call). RANDOM weights.
# Usage: bash scripts/gpu_flags_ab.sh OUT [SHAPE] [TP]
# Variants: default (with floor); synchronous all-reduces (no cross-stream events per collective);
# XLA's one-shot all-reduce kernel; a larger dot-merger threshold (q/k/v and gate/up as one GEMM);
# command buffers (CUDA graphs) incl. loops; and (no flag) --fused-projections.
set -uo pipefail
out=${1:-/tmp/ab}; shape=${2:-llama2-7b}; tp=${3:-2}
mkdir -p "$out"; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
i=0
for flags in "" "--xla_gpu_disable_async_collectives=ALLREDUCE" "--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true" \
             "--xla_gpu_dot_merger_threshold_mb=256" "$CB"; do
  i=$((i+1)); echo "=== variant $i: XLA_FLAGS='$flags'"
  extra=; [ $i = 1 ] && extra=--floor
  XLA_FLAGS="$flags" timeout 200 python launch/bench.py --shape "$shape" --tp "$tp" --spd-ratios 0,1 $extra \
    --repeats 3 --json "$out/v$i.json" 2>&1 | grep -v -i warn | head -7
done
echo "=== variant 6: --fused-projections"
timeout 200 python launch/bench.py --shape "$shape" --tp "$tp" --spd-ratios 0,1 --fused-projections \
  --repeats 3 --json "$out/v6.json" 2>&1 | grep -v -i warn | head -7
