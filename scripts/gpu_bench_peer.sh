#!/usr/bin/env bash
# Our sync/SPD/floor decode and the transformers TP peer, same shape, same GPUs, one call. RANDOM weights.
# Usage: bash scripts/gpu_bench_peer.sh OUTDIR SHAPE TP [RATIOS] [INTERCONNECTS]
#   e.g. bash scripts/gpu_bench_peer.sh out llama2-7b 4 0,0.25,0.5,0.75,1 "hbw lbw"
# PEER=0 skips the peer (it exists for LLaMA shapes only). The XLA compilation cache makes the second
# interconnect reuse the first one's compiled programs. DEADLINE (epoch seconds) caps every step's
# timeout so the whole script ends before it; COMPILE_THREADS (default 6) is passed to launch/bench.py.
# Each run writes NCCL's INIT log (which transport every channel uses) to OUTDIR/nccl-*.log.
# The peer's random checkpoint goes to PEER_DIR (default: /dev/shm when it has room for it, else /tmp: a
# 70B checkpoint is 138 GB, and memory is faster to write and read than disk); PEER_REPEATS (default 3).
# Every step prints its wall time ("-- 123 s: ..."). BENCH_ARGS (word-split) go to every launch/bench.py run,
# e.g. BENCH_ARGS="--fused-projections" or "--new-tokens 256".
set -uo pipefail
out=${1:-/tmp/bench}; shape=${2:-llama2-7b}; tp=${3:-2}; ratios=${4:-0,0.5,1}; ics=${5:-hbw}
mkdir -p "$out"; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
deadline=${DEADLINE:-$(( $(date +%s) + 100000 ))}
budget() {  # budget WANTED: min(WANTED, seconds left before DEADLINE - 5)
  local left=$(( deadline - $(date +%s) - 5 )); [ "$left" -lt "$1" ] && echo "$left" || echo "$1"; }
step() {  # step WANTED CMD...: run CMD under a timeout that respects DEADLINE; skip if no time is left
  local t; t=$(budget "$1"); shift
  if [ "$t" -lt 20 ]; then echo "!! skipped (deadline): $*"; return 1; fi
  local t0=$SECONDS; timeout "$t" "$@"; local rc=$?
  [ $rc = 124 ] && echo "!! timed out after ${t}s: $*"
  echo "-- $((SECONDS - t0)) s (rc $rc): ${*:1:4}" >&2; return $rc; }
peer_args=()
if [ "${PEER:-1}" = 1 ]; then
  need=$(python -c "from spd_jax.bench import param_count as p; print(int(p('$shape') * 2.2 / 2**20))")
  shm=$(df -Pm /dev/shm 2>/dev/null | awk 'NR==2 {print $4}')
  ck=${PEER_DIR:-$([ "${shm:-0}" -gt "$need" ] && echo /dev/shm || echo /tmp)}/peer-$shape
  echo "peer checkpoint: $ck (needs ~$need MiB; /dev/shm has ${shm:-0} MiB free)"
  step 600 python launch/bench_peer.py --make-checkpoint "$ck" --shape "$shape" 2>&1 | tail -1
  pr=(--repeats "${PEER_REPEATS:-3}" --json "$out/peer-$shape-tp$tp.json")
  if [ "$tp" = 1 ]; then
    step 300 python launch/bench_peer.py --checkpoint "$ck" "${pr[@]}" 2>&1 | grep "^#"
  else
    step 400 torchrun --nproc-per-node "$tp" launch/bench_peer.py --checkpoint "$ck" "${pr[@]}" 2>&1 | grep "^#"
  fi
  [ -f "$out/peer-$shape-tp$tp.json" ] && peer_args=(--peer-json "$out/peer-$shape-tp$tp.json")
fi
floor=--floor; [ "$tp" = 1 ] && floor= && ics=hbw
for ic in $ics; do
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT NCCL_DEBUG_FILE="$out/nccl-$shape-tp$tp-$ic.%p.log" \
  step 590 python launch/bench.py --shape "$shape" --tp "$tp" --spd-ratios "$ratios" $floor --repeats 3 \
    --interconnect "$ic" --compile-cache /tmp/xla-cache --compile-threads "${COMPILE_THREADS:-6}" "${peer_args[@]}" ${BENCH_ARGS:-} \
    --json "$out/$shape-tp$tp-$ic.json" 2>&1 | grep -v -i warn
  cat "$out"/nccl-"$shape"-tp"$tp"-"$ic".*.log 2>/dev/null | grep -o " via [A-Za-z/0-9]*" | sort | uniq -c \
    | sed "s/^/nccl channels ($ic): /"
done
