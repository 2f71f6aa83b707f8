#!/usr/bin/env bash
# Our sync/SPD/floor decode and the transformers TP peer, same shape, same GPUs, one call. RANDOM weights.
# Usage: bash scripts/gpu_bench_peer.sh OUTDIR SHAPE TP [RATIOS] [INTERCONNECTS]
#   e.g. bash scripts/gpu_bench_peer.sh out llama2-7b 4 0,0.25,0.5,0.75,1 "hbw lbw"
# PEER=0 skips the peer (it exists for LLaMA shapes only). The XLA compilation cache makes the second
# interconnect reuse the first one's compiled programs.
set -uo pipefail
out=${1:-/tmp/bench}; shape=${2:-llama2-7b}; tp=${3:-2}; ratios=${4:-0,0.5,1}; ics=${5:-hbw}
mkdir -p "$out"; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
peer_args=()
if [ "${PEER:-1}" = 1 ]; then
  ck=/tmp/peer-$shape
  timeout 400 python launch/bench_peer.py --make-checkpoint "$ck" --shape "$shape" 2>&1 | tail -1
  if [ "$tp" = 1 ]; then
    timeout 300 python launch/bench_peer.py --checkpoint "$ck" --json "$out/peer-$shape-tp$tp.json" 2>&1 | grep "^#"
  else
    timeout 300 torchrun --nproc-per-node "$tp" launch/bench_peer.py --checkpoint "$ck" \
      --json "$out/peer-$shape-tp$tp.json" 2>&1 | grep "^#"
  fi
  [ -f "$out/peer-$shape-tp$tp.json" ] && peer_args=(--peer-json "$out/peer-$shape-tp$tp.json")
fi
floor=--floor; [ "$tp" = 1 ] && floor= && ics=hbw
for ic in $ics; do
  timeout 500 python launch/bench.py --shape "$shape" --tp "$tp" --spd-ratios "$ratios" $floor --repeats 3 \
    --interconnect "$ic" --compile-cache /tmp/xla-cache "${peer_args[@]}" --json "$out/$shape-tp$tp-$ic.json" \
    2>&1 | grep -v -i warn
done
