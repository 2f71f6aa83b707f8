#!/usr/bin/env bash
# Our sync/SPD/floor decode and the transformers TP peers, same shape, same GPUs, one call. RANDOM weights.
# Usage: bash scripts/gpu_bench_peer.sh OUTDIR SHAPE TP [RATIOS] [INTERCONNECTS]
#   e.g. bash scripts/gpu_bench_peer.sh out llama2-7b 4 0,0.25,0.5,0.7,0.75,1 "nvlink pcie net"
# Our runs use one process per GPU (`launch/bench.py --spawn TP`, as deployed); SPAWN=0 drives all GPUs
# from one process instead (a labelled comparison). The first interconnect should be nvlink: the later
# modes' runs get its JSON as --link-reference, so each says whether its small all-reduces really were
# slower; LINK_REFERENCE=JSON gives them an nvlink run of an earlier call (same machine, same TP) when
# this call runs no nvlink. PEER=0 skips the peers (LLaMA shapes only); PEER_COMPILED=1 (default) also runs transformers'
# static-cache + torch.compile configuration; PEER_CONFIGS="compiled" runs that one alone. The XLA compilation cache makes later interconnects reuse
# the first one's compiled programs. DEADLINE (epoch seconds) caps every step's timeout so the whole
# script ends before it; COMPILE_THREADS (default 6) is passed to launch/bench.py.
# Each run writes NCCL's INIT log (which transport every channel uses) to OUTDIR/nccl-*.log.
# The peer's random checkpoint goes to PEER_DIR (default: /dev/shm when it has room for it, else /tmp: a
# 70B checkpoint is 138 GB, and memory is faster to write and read than disk); PEER_REPEATS (default 3).
# Every step prints its wall time ("-- 123 s: ..."). BENCH_ARGS (word-split) go to every launch/bench.py run,
# e.g. BENCH_ARGS="--no-fused-projections" or "--new-tokens 256".
set -uo pipefail
out=${1:-/tmp/bench}; shape=${2:-llama2-7b}; tp=${3:-2}; ratios=${4:-0,0.5,1}; ics=${5:-nvlink}
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
  for cfg in ${PEER_CONFIGS:-eager $([ "${PEER_COMPILED:-1}" = 1 ] && echo compiled)}; do
    pj="$out/peer-$shape-tp$tp-$cfg.json"
    pr=(--repeats "${PEER_REPEATS:-3}" --json "$pj"); [ "$cfg" = compiled ] && pr+=(--compiled)
    if [ "$tp" = 1 ]; then
      step 400 python launch/bench_peer.py --checkpoint "$ck" "${pr[@]}" 2>&1 | grep "^#\|Error"
    else
      step 500 torchrun --nproc-per-node "$tp" launch/bench_peer.py --checkpoint "$ck" "${pr[@]}" 2>&1 \
        | grep "^#\|Error" | sort -u
    fi
    [ -f "$pj" ] && peer_args+=(--peer-json "$pj")
  done
fi
floor=--floor; [ "$tp" = 1 ] && floor= && ics=nvlink
spawn=(); [ "${SPAWN:-1}" = 1 ] && [ "$tp" -gt 1 ] && spawn=(--spawn "$tp")
layout=$([ ${#spawn[@]} -gt 0 ] && echo 1proc || echo 1procall)
ref=(); [ -n "${LINK_REFERENCE:-}" ] && ref=(--link-reference "$LINK_REFERENCE")
for ic in $ics; do
  json="$out/$shape-tp$tp-$ic-$layout.json"
  NCCL_DEBUG=INFO NCCL_DEBUG_SUBSYS=INIT NCCL_DEBUG_FILE="$out/nccl-$shape-tp$tp-$ic-$layout.%p.log" \
  step 590 python launch/bench.py --shape "$shape" --tp "$tp" --spd-ratios "$ratios" $floor --repeats 3 \
    --interconnect "$ic" --compile-cache /tmp/xla-cache --compile-threads "${COMPILE_THREADS:-6}" "${spawn[@]}" \
    "${peer_args[@]}" "${ref[@]}" ${BENCH_ARGS:-} --json "$json" 2>&1 | grep -v -i warn
  [ "$ic" = nvlink ] || [ "$ic" = hbw ] && [ -f "$json" ] && ref=(--link-reference "$json")
  cat "$out"/nccl-"$shape"-tp"$tp"-"$ic"-"$layout".*.log 2>/dev/null | grep -o " via [A-Za-z/0-9]*" | sort | uniq -c \
    | sed "s/^/nccl channels ($ic): /"
done
