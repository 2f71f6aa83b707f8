#!/usr/bin/env bash
# NCCL's psum against the one-shot all-reduces (spd_jax/collectives.py: gather, a2a), one process per GPU,
# per link, in one call: the microbenchmark's per-size choice table and the model's decode with every method
# (each method's SPD rows against its own sync row). RANDOM weights.
# Usage: bash scripts/gpu_allreduce.sh OUTDIR SHAPE TP RATIOS "LINKS" [METHODS]
#   e.g. bash scripts/gpu_allreduce.sh out llama2-7b 4 0,0.7,1 "nvlink net" psum,gather,a2a
# Runs scripts/gpu_bench_peer.sh with PEER=0; DEADLINE / COMPILE_THREADS / BENCH_ARGS as there.
set -uo pipefail
out=${1:-/tmp/ar}; shape=${2:-llama2-7b}; tp=${3:-4}; ratios=${4:-0,0.7,1}; links=${5:-nvlink net}
methods=${6:-psum,gather,a2a}
PEER=0 BENCH_ARGS="--allreduce-methods $methods ${BENCH_ARGS:-}" \
  bash "$(dirname "$0")/gpu_bench_peer.sh" "$out" "$shape" "$tp" "$ratios" "$links"
