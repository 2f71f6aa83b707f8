#!/usr/bin/env bash
# A/B of decode-path options on one shape: same machine, same call, one process per GPU. RANDOM weights.
# Usage: bash scripts/gpu_flags_ab.sh OUT [SHAPE] [TP] [VARIANTS]
# VARIANTS (space-separated, default "default fused cmdbuf cmdbuf+fused"):
#   default       the shipped decode path
#   fused         --fused-projections (q/k/v and gate/up as one GEMM each)
#   noshadow      batch-1 decode on one row, each product padded to two (--no-shadow-row; before session 8)
#   cmdbuf        XLA command buffers (CUDA graphs) over fusions, GEMMs and the decode loop itself
#   syncar        synchronous all-reduces (--xla_gpu_disable_async_collectives=ALLREDUCE)
#   merge         XLA's dot merger with a large threshold (merges q/k/v without a layout change)
#   a+b           both options
# Every variant runs sync, SPD on all blocks and the no-all-reduce floor, and measures HBM read bandwidth,
# so each row has its own per-block overhead. BENCH_ARGS go to every run. Prints a table at the end.
set -uo pipefail
out=${1:-/tmp/ab}; shape=${2:-llama2-7b}; tp=${3:-2}; variants=${4:-default fused cmdbuf cmdbuf+fused}
mkdir -p "$out"; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
spawn=(); [ "$tp" -gt 1 ] && spawn=(--spawn "$tp")
floor=--floor; ratios=0,1; [ "$tp" = 1 ] && ratios=0
for v in $variants; do
  flags=""; extra=()
  for part in ${v//+/ }; do
    case $part in
      default) ;;
      fused) extra+=(--fused-projections) ;;
      noshadow) extra+=(--no-shadow-row) ;;
      cmdbuf) flags="$flags $CB" ;;
      syncar) flags="$flags --xla_gpu_disable_async_collectives=ALLREDUCE" ;;
      merge) flags="$flags --xla_gpu_dot_merger_threshold_mb=256" ;;
      *) echo "unknown variant part $part"; exit 2 ;;
    esac
  done
  echo "=== $v: XLA_FLAGS='${flags# }' ${extra[*]}"
  t0=$SECONDS
  XLA_FLAGS="${flags# }" timeout "${STEP_TIMEOUT:-240}" python launch/bench.py --shape "$shape" --tp "$tp" \
    --spd-ratios $ratios $floor --repeats 3 --compile-threads 6 "${spawn[@]}" "${extra[@]}" ${BENCH_ARGS:-} \
    --json "$out/$shape-tp$tp-${v//+/_}.json" 2>&1 | grep -v -i "warn\|^\[bench" | head -12
  echo "-- $v: $((SECONDS - t0)) s"
done
python - "$out" "$shape" "$tp" $variants <<'PY'
import json, sys, pathlib
out, shape, tp, *variants = sys.argv[1:]
print(f"\n{shape} TP {tp} (tpot ms; x = over weight bytes / measured HBM read bandwidth)")
print("| variant | device | HBM GB/s | bytes ms | sync | SPD all | floor | sync x | floor x | overhead us/block |")
print("|---|---|---|---|---|---|---|---|---|---|")
for v in variants:
    f = pathlib.Path(out) / f"{shape}-tp{tp}-{v.replace('+', '_')}.json"
    if not f.exists():
        print(f"| {v} | (no result) |"); continue
    d = json.loads(f.read_text()); b = d.get("decode_budget") or {}
    t = {r["label"]: r["tpot_ms"] for r in d["rows"]}
    spd = next((r["tpot_ms"] for r in d["rows"] if r["label"] == "r=1.00"), float("nan"))
    print(f"| {v} | {d['n_devices']}x {d['device']} ({d['n_processes']} proc) | {d['hbm']['read_GBps']:.0f} | "
          f"{b.get('bytes_ms', float('nan')):.3f} | {t['r=0.00']:.3f} | {spd:.3f} | {t.get('floor', float('nan')):.3f} | "
          f"{b.get('x_bytes', {}).get('sync', float('nan')):.2f} | {b.get('x_bytes', {}).get('floor', float('nan')):.2f} | "
          f"{b.get('overhead_per_block_us', float('nan')):.1f} |")
PY
