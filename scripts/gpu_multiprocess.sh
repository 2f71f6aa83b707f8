#!/usr/bin/env bash
# One process per GPU vs one process for both GPUs: same logits and tokens (TP 2, sync and SPD).
set -uo pipefail
model=$1; out=${2:-/tmp/mp}; mkdir -p "$out"; export PYTHONPATH=$PWD
for b in none all; do
  python launch/local_cluster.py --num-processes 2 --gpus-per-process 1 -- \
    python tests/mp_worker.py "$model" "$out/mp_$b.npz" $b --tp 2 2>&1 | grep -iv "warn" | tail -2
  python tests/mp_worker.py "$model" "$out/sp_$b.npz" $b --tp 2 2>&1 | grep -iv "warn" | tail -2
  python -c "
import numpy as np; a=np.load('$out/mp_$b.npz'); s=np.load('$out/sp_$b.npz')
print('spd=$b', 'processes', int(a['processes']), 'vs', int(s['processes']), 'on', a['device'],
      'max|dlogit|', float(np.abs(a['logits']-s['logits']).max()), 'same tokens', bool((a['tokens']==s['tokens']).all()))"
done
