#!/usr/bin/env bash
# Several benchmark jobs in one device call, under one deadline, then one table. RANDOM weights.
# Usage: bash scripts/gpu_campaign.sh OUTDIR SECONDS JOB...
#   JOB = SHAPE:TP:RATIOS:INTERCONNECTS:PEER   (INTERCONNECTS joined by '+', PEER 1 or 0)
#   e.g. bash scripts/gpu_campaign.sh $OUT 560 llama2-7b:4:0,0.25,0.5,0.7,0.75,1:nvlink+pcie+net:1 llama2-13b:4:0,1:hbw:0
# Each job sees only the first TP GPUs (CUDA_VISIBLE_DEVICES), so TP 1/2 rows can come from a bigger host;
# GPU0=k starts at GPU k instead, so that two campaigns can run side by side on disjoint GPUs
# (e.g. GPU0=2 for the second pair of a 4-GPU host; give each its own OUTDIR).
# Jobs run in the order given; a job that no longer fits before the deadline is skipped and says so.
# Everything lands in OUTDIR/results.tgz (JSON, NCCL logs, this log) and the table is printed at the end.
set -uo pipefail
out=${1:?OUTDIR}; secs=${2:?SECONDS}; shift 2
g0=${GPU0:-0}; work=/tmp/campaign-gpu$g0; rm -rf "$work"; mkdir -p "$work" "$out"
export DEADLINE=$(( $(date +%s) + secs ))
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | sort | uniq -c
for job in "$@"; do
  IFS=: read -r shape tp ratios ics peer <<<"$job"
  left=$(( DEADLINE - $(date +%s) ))
  echo "=== $job ($left s left)"
  [ "$left" -lt 60 ] && { echo "!! skipped (deadline): $job"; continue; }
  CUDA_VISIBLE_DEVICES=$(seq -s, "$g0" $((g0 + tp - 1))) PEER=$peer \
    bash scripts/gpu_bench_peer.sh "$work" "$shape" "$tp" "$ratios" "${ics//+/ }"
done 2>&1 | tee "$work/campaign.log"
python scripts/bench_table.py "$work"/*.json | tee "$work/table.md"
tar czf "$out/results.tgz" -C "$work" .
