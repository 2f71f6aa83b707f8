#!/usr/bin/env bash
# A/B of decode-path options on one shape: same machine, same call, one process per GPU. RANDOM weights.
# Usage: bash scripts/gpu_flags_ab.sh OUT [SHAPE] [TP] [VARIANTS]
# VARIANTS (space-separated, default "default fused cmdbuf cmdbuf+fused"):
#   default       the shipped decode path (since 2026-11-29: fused projections, folded norms on RMSNorm shapes,
#                 decode attention by the Pallas kernel on CUDA GPUs)
#   old           the shipped path before 2026-11-29: nofused+nofold+xla
#   fused         --fused-projections (q/k/v and gate/up as one GEMM each; on by default since 2026-11-29)
#   nofused       --no-fused-projections
#   nofold        --no-fold-norms
#   xla           decode attention by XLA's masked attention (--attention-kernel xla)
#   noshadow      batch-1 decode on one row, each product padded to two (--no-shadow-row; before 2026-11-28)
#   pallas        decode attention by the Pallas kernel (--attention-kernel pallas, spd_jax/kernels.py)
#   cmdbuf        XLA command buffers (CUDA graphs) over fusions, GEMMs and the decode loop itself
#   syncar        synchronous all-reduces (--xla_gpu_disable_async_collectives=ALLREDUCE)
#   merge         XLA's dot merger with a large threshold (merges q/k/v without a layout change)
#   oneshot       XLA's one-shot all-reduce kernel for small messages
#                 (--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true; no multimem/multicast flag is set).
#                 XLA's collective_kernel_thunk.cc requires CUDA peer access between the clique's local
#                 devices, so expect it to apply only with SPAWN=0 (one process); not yet run on GPUs
#   nocmdbuf      no XLA command buffers at all (the default puts runs of >= 5 kernels into CUDA graphs)
#   cmdwhile      command buffers also over the decode loop (WHILE/CONDITIONAL) at XLA's default minimum size
#   pdl / nopdl   programmatic dependent launch on / off (--xla_gpu_enable_pdl; Hopper: a kernel's launch
#                 overlaps the previous kernel's tail)
#   blockrw       XLA's block-level fusion rewriter (--xla_gpu_experimental_enable_fusion_block_level_rewriter)
#   heroless      Triton heroless priority fusion (--xla_gpu_experimental_enable_triton_heroless_priority_fusion)
#   noblockrw     the block-level fusion rewriter off (=false): the norms' sums of squares are Triton block-level
#                 fusions in JAX 0.11's decode HLO, apart from the residual add that feeds them (2026-11-29:
#                 no change; XLA 0.11 no longer knows the Triton softmax-fusion flags of older XLAs)
#   fold          --fold-norms (RMSNorm weights folded into the projections, 1/rms applied after them; default)
#   tmof          Triton multi-output fusions (--xla_gpu_unsupported_enable_triton_multi_output_fusion)
#   alltriton     every fusion emitted by Triton (--xla_gpu_experimental_all_fusions_with_triton)
#   fautotune     XLA's fusion autotuner (--xla_gpu_experimental_enable_fusion_autotuner)
#   warpspec      Triton warp specialisation for GEMMs (--xla_gpu_experimental_enable_triton_warp_specialization)
#   gemmv2        XLA's second GEMM fusion emitter (--xla_gpu_experimental_gemm_fusion_v2)
#   unroll        loops inside command buffers unrolled (--xla_gpu_command_buffer_unroll_loops; with cmdwhile)
#   nosplitk      every Triton GEMM without split-K (--xla_gpu_experimental_force_split_k=1): no partial-sum
#                 kernels after the projections, fewer thread blocks per GEMM
#   a+b           both options
# Every variant runs sync, SPD on all blocks and the no-all-reduce floor, and measures HBM read bandwidth,
# so each row has its own per-block overhead. BENCH_ARGS go to every run. SPAWN=0 drives all GPUs from one
# process (a labelled comparison; the default is one process per GPU). Prints a table at the end.
set -uo pipefail
out=${1:-/tmp/ab}; shape=${2:-llama2-7b}; tp=${3:-2}; variants=${4:-default fused cmdbuf cmdbuf+fused}
mkdir -p "$out"; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"
spawn=(); [ "$tp" -gt 1 ] && [ "${SPAWN:-1}" = 1 ] && spawn=(--spawn "$tp")
floor=--floor; ratios=0,1; [ "$tp" = 1 ] && ratios=0
for v in $variants; do
  flags=""; extra=()
  for part in ${v//+/ }; do
    case $part in
      default) ;;
      fused) extra+=(--fused-projections) ;;
      nofused) extra+=(--no-fused-projections) ;;
      nofold) extra+=(--no-fold-norms) ;;
      xla) extra+=(--attention-kernel xla) ;;
      old) extra+=(--no-fused-projections --no-fold-norms --attention-kernel xla) ;;
      noshadow) extra+=(--no-shadow-row) ;;
      pallas) extra+=(--attention-kernel pallas) ;;
      cmdbuf) flags="$flags $CB" ;;
      syncar) flags="$flags --xla_gpu_disable_async_collectives=ALLREDUCE" ;;
      merge) flags="$flags --xla_gpu_dot_merger_threshold_mb=256" ;;
      oneshot) flags="$flags --xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true" ;;
      fold) extra+=(--fold-norms) ;;
      tmof) flags="$flags --xla_gpu_unsupported_enable_triton_multi_output_fusion=true" ;;
      alltriton) flags="$flags --xla_gpu_experimental_all_fusions_with_triton=true" ;;
      fautotune) flags="$flags --xla_gpu_experimental_enable_fusion_autotuner=true" ;;
      warpspec) flags="$flags --xla_gpu_experimental_enable_triton_warp_specialization=true" ;;
      gemmv2) flags="$flags --xla_gpu_experimental_gemm_fusion_v2=true" ;;
      unroll) flags="$flags --xla_gpu_command_buffer_unroll_loops=true" ;;
      nosplitk) flags="$flags --xla_gpu_experimental_force_split_k=1" ;;
      nocmdbuf) flags="$flags --xla_gpu_enable_command_buffer=" ;;
      cmdwhile) flags="$flags --xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL" ;;
      pdl) flags="$flags --xla_gpu_enable_pdl=true" ;;
      nopdl) flags="$flags --xla_gpu_enable_pdl=false" ;;
      blockrw) flags="$flags --xla_gpu_experimental_enable_fusion_block_level_rewriter=true" ;;
      heroless) flags="$flags --xla_gpu_experimental_enable_triton_heroless_priority_fusion=true" ;;
      noblockrw) flags="$flags --xla_gpu_experimental_enable_fusion_block_level_rewriter=false" ;;
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
runs = {}
for v in variants:
    f = pathlib.Path(out) / f"{shape}-tp{tp}-{v.replace('+', '_')}.json"
    runs[v] = json.loads(f.read_text()) if f.exists() else None
done = [d for d in runs.values() if d and d.get("hbm")]
if not done:
    sys.exit("no results")
# the read bandwidth varies ~10% between processes: the budget uses the highest measured in this call
bw = max(d["hbm"]["read_GBps"] for d in done)
L = {"llama2-7b": 32, "llama2-13b": 40, "llama2-70b": 80}.get(shape)
print(f"\n{shape} TP {tp}, tpot ms; weight stream = weight bytes / {bw:.0f} GB/s (highest read bandwidth of the call)")
print("| variant | device | this run's GB/s | sync | SPD all | floor | sync x stream | floor x stream | overhead us/block |")
print("|---|---|---|---|---|---|---|---|---|")
for v, d in runs.items():
    if d is None:
        print(f"| {v} | (no result) |"); continue
    t = {r["label"]: r["tpot_ms"] for r in d["rows"]}
    stream = d["weight_bytes_per_device"] / (bw * 1e9) * 1e3
    nan = float("nan")
    over = (t["floor"] - stream) * 1e3 / L if "floor" in t and L else nan
    print(f"| {v} | {d['n_devices']}x {d['device']} ({d['n_processes']} proc) | {d['hbm']['read_GBps']:.0f} | "
          f"{t['r=0.00']:.3f} | {t.get('r=1.00', nan):.3f} | {t.get('floor', nan):.3f} | {t['r=0.00'] / stream:.2f} | "
          f"{t.get('floor', nan) / stream:.2f} | {over:.1f} |")
PY
