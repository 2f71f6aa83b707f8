#!/usr/bin/env bash
# A/B of XLA GPU flags on one shape (same machine, same call). RANDOM weights.
set -uo pipefail
out=${1:-/tmp/ab}; shape=${2:-llama2-7b}; tp=${3:-2}
mkdir -p "$out"; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
i=0
for flags in "" "$CB" "$CB --xla_gpu_enable_triton_gemm=false"; do
  i=$((i+1)); echo "=== variant $i: XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" timeout 240 python launch/bench.py --shape "$shape" --tp "$tp" --spd-ratios 0,1 --floor \
    --repeats 3 --json "$out/v$i.json" 2>&1 | grep -v -i warn | head -6
done
