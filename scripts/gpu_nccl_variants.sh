#!/usr/bin/env bash
# NCCL algorithm / protocol variants against the one-shot all-reduces, per link, one process per GPU: the
# all-reduce microbenchmark of launch/bench.py (in-loop cost at 8 KiB / 1 MiB / 64 MiB for psum, gather and
# a2a) under each NCCL_ALGO x NCCL_PROTO setting, on a tiny model (the microbenchmark does not depend on it).
# Usage: bash scripts/gpu_nccl_variants.sh OUTDIR TP "LINKS" ["VARIANT ..."]
#   VARIANT = default | ALGO/PROTO | NCCL_X=V[+NCCL_Y=W...] (any NCCL variables, e.g. socket threads, channels)
#   e.g. bash scripts/gpu_nccl_variants.sh out 4 "nvlink net" "default Ring/LL Tree/LL NCCL_MAX_NCHANNELS=1"
# Every run also times one point-to-point exchange per size (--time-exchange).
# Each run's JSON goes to OUTDIR/ar-LINK-ALGO-PROTO.json; the table at the end comes from them.
set -uo pipefail
out=${1:-/tmp/nccl}; tp=${2:-4}; links=${3:-nvlink net}
variants=${4:-default Ring/LL Ring/LL128 Ring/Simple Tree/LL Tree/Simple}
mkdir -p "$out"; export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
for link in $links; do
  for v in $variants; do
    env=(); tag=default
    # the algorithm is scoped to all-reduce (NCCL >= 2.24 syntax): a bare NCCL_ALGO=Tree also applies to the
    # all-gathers JAX issues at start-up, which have no Tree algorithm ("no algorithm/protocol available for
    # function AllGather", measured at TP 4 on 2026-11-28)
    if [[ "$v" == *=* ]]; then IFS=+ read -r -a env <<<"$v"; tag=$(echo "$v" | tr -d '=' | tr '+' '.')
    elif [ "$v" != default ]; then env=(NCCL_ALGO="allreduce:${v%/*}" NCCL_PROTO="${v#*/}"); tag="${v%/*}-${v#*/}"; fi
    t0=$SECONDS
    env "${env[@]}" timeout 240 python launch/bench.py --shape tiny --tp "$tp" --spd-ratios 0 --repeats 1 \
      --interconnect "$link" --spawn "$tp" --allreduce-methods psum,gather,a2a --time-exchange --json "$out/ar-$link-$tag.json" \
      > "$out/ar-$link-$tag.log" 2>&1
    echo "-- $link $tag: rc $? in $((SECONDS - t0)) s"
  done
done
python - "$out" <<'PY'
import glob, json, os, sys
print("| link | NCCL_ALGO/PROTO | method | 8 KiB (us) | 1 MiB (us) | 64 MiB (us) |")
print("|---|---|---|---|---|---|")
for f in sorted(glob.glob(os.path.join(sys.argv[1], "ar-*.json"))):
    r = json.load(open(f))
    _, link, *tag = os.path.basename(f)[:-5].split("-")
    by = {}
    for row in r.get("allreduce", []):
        for m, us in (row.get("in_loop_us_by_method") or {"psum": row.get("in_loop_us")}).items():
            by.setdefault(m, {})[row["bytes"]] = us
        if "one_exchange_us" in row:
            by.setdefault("one exchange", {})[row["bytes"]] = row["one_exchange_us"]
    for m, sizes in sorted(by.items()):
        cells = [f"{sizes[b]:.1f}" if sizes.get(b) is not None else "-" for b in (8192, 1 << 20, 64 << 20)]
        print(f"| {link} | {'/'.join(tag)} | {m} | " + " | ".join(cells) + " |")
PY
