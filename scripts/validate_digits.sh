#!/usr/bin/env bash
# The validator's reference figures on digits: random real subsets at IPC 1 and 10 under each
# protocol (3 subsets each, mean ± population std), and (nearly) full data: 139 images per class,
# the smallest class. Results land in runs/digits_random/.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p runs/digits_random
for ipc in 1 10; do
  for protocol in rded fkd static hard; do
    uv run python validate_fkd.py --random-real "$ipc" --protocol "$protocol" --repeats 3 \
      --out "runs/digits_random/ipc${ipc}_${protocol}.json" 2>&1 | grep -E "^result"
  done
done
for protocol in rded hard; do
  uv run python validate_fkd.py --random-real 139 --protocol "$protocol" --epochs 30 --eval-every 5 \
    --out "runs/digits_random/full_${protocol}.json" 2>&1 | grep -E "^result"
done
