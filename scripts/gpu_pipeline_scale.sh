#!/usr/bin/env bash
# The SPD pipeline at LLaMA-2-7B shape on GPUs: RANDOM weights written as a real Hugging Face checkpoint
# (sharded safetensors, a real tokenizer copied in), real TP, one process per GPU, bf16; per stage the
# pipeline logs wall time and peak GPU / host memory ([stage] lines, report.json "memory_gib"); a sampler
# adds the host memory of all processes (anonymous RSS summed, which is what the host must hold; file-backed
# pages such as the memory-mapped teacher states are reclaimable page cache, logged apart as the largest
# per-process file RSS) and nvidia-smi's memory per card (OUT/mem.log). Then a kill during B2B and --resume
# to the end: KILL_ON=PATTERN sends SIGTERM to the launcher when a log line matches PATTERN (grep -E, e.g.
# KILL_ON='saved block [0-9]+ step 4' after the n-th match with KILL_COUNT=n), or KILL_AFTER=SECONDS after the start.
# Usage: bash scripts/gpu_pipeline_scale.sh OUTDIR TP TOKENIZER_DIR DATA [train_distill args ...]
#   e.g. KILL_AFTER=240 bash scripts/gpu_pipeline_scale.sh out 2 .scale/tokenizer .scale/wiki.jsonl \
#          --calib-samples 128 --calib-len 2048 --ratio 0.7 --epochs 1
# Random checkpoint: /dev/shm (RAM); run folder (teacher states, checkpoints): RUN (default: a folder on the
# disk under the repository, so the teacher states are not held in RAM). SHAPE (default llama2-7b).
set -uo pipefail
out=$1; tp=$2; tokdir=$3; data=$4; shift 4
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
mkdir -p "$out"; ck=/dev/shm/ckpt-${SHAPE:-llama2-7b}; run=${RUN:-$PWD/.scale-run}; rm -rf "$run"
df -h "$(dirname "$run")" /dev/shm | sed 's/^/-- /'

t0=$SECONDS
python launch/bench_peer.py --make-checkpoint "$ck" --shape "${SHAPE:-llama2-7b}" --tokenizer "$tokdir" | tail -1
echo "-- random checkpoint written in $((SECONDS - t0)) s: $(du -sh "$ck" | cut -f1)"
( while true; do
    anon=0; file=0
    for p in $(pgrep -f train_distill.py); do
      a=$(awk '/^RssAnon/ {print $2}' /proc/$p/status 2>/dev/null); f=$(awk '/^RssFile/ {print $2}' /proc/$p/status 2>/dev/null)
      anon=$((anon + ${a:-0})); [ "${f:-0}" -gt "$file" ] && file=${f:-0}
    done
    gpu=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | paste -sd' ')
    echo "$((SECONDS)) host_anon_kib=$anon host_file_kib=$file gpu_mib=$gpu"; sleep 2; done ) > "$out/mem.log" 2>/dev/null &
mon=$!
stamp() { while IFS= read -r l; do echo "[+$((SECONDS - t0))s] $l"; done; }  # line by line: nothing held back
cmd=(python launch/train_distill.py --model "$ck" --tp "$tp" --spawn "$tp" --no-emulate --dtype bfloat16
     --data "$data" --out "$run" --no-progress "$@")
t1=$SECONDS
filt() { tee -a "$out/pipeline.log" | grep --line-buffered -v -i "warn\|grpc\|source location\|^\[+[0-9]*s\] *$"; }
if [ -n "${KILL_ON:-}" ]; then  # a kill at a known point of the run, not at a guessed time
  ( n=0; while sleep 0.5; do
      n=$(grep -E -c -- "$KILL_ON" "$out/pipeline.log" 2>/dev/null); n=${n:-0}
      if [ "$n" -ge "${KILL_COUNT:-1}" ]; then
        echo "-- KILL_ON: '$KILL_ON' seen $n times: SIGTERM to the launcher" | tee -a "$out/pipeline.log"
        pkill -TERM -o -f "launch/train_distill.py"; break; fi
    done ) &
  watcher=$!
fi
timeout -s TERM "${KILL_AFTER:-100000}" "${cmd[@]}" 2>&1 | stamp | filt
[ -n "${watcher:-}" ] && kill "$watcher" 2>/dev/null  # the resumed run below must not match it again
echo "-- first run ended after $((SECONDS - t1)) s (killed if KILL_AFTER=${KILL_AFTER:-none} was reached)"
if [ ! -f "$run/report.json" ]; then
  t2=$SECONDS
  "${cmd[@]}" --resume 2>&1 | stamp | filt
  echo "-- resumed run ended after $((SECONDS - t2)) s"
fi
kill $mon 2>/dev/null
cp "$run/report.json" "$run/plan.json" "$out/" 2>/dev/null
awk '{split($2,a,"="); if (a[2]>m) m=a[2]} END {printf "peak host anonymous RSS, all processes summed: %.1f GiB\n", m/2^20}' "$out/mem.log"
awk '{split($3,a,"="); if (a[2]>m) m=a[2]} END {printf "peak file-backed RSS of one process (page cache): %.1f GiB\n", m/2^20}' "$out/mem.log"
awk '{for (i=4;i<=NF;i++){g=$i; sub("gpu_mib=","",g); if (g+0>m) m=g+0}} END {printf "peak GPU memory used (nvidia-smi): %.1f GiB\n", m/1024}' "$out/mem.log"
grep -h "\[stage\]" "$out/pipeline.log" | sed 's/^/-- /'
rm -rf "$run"
