#!/usr/bin/env bash
# The baselines DELT builds on, from the same file (VILA-Lab/SRe2L@8d00cba: SRe2L/recover and CDA/): CDA = noise init, no EarlyLate, cosine
# crop curriculum; SRe2L = CDA without the curriculum (milestone 0) and with a roll jitter (32 px at 224 px in SRe2L; 4 px as its CIFAR recipe for 32-px digits).
set -euo pipefail
for ipc in 1 10; do
  uv run python delt.py --ipc "$ipc" --init noise --no-early-late --out "runs/cda_digits_ipc${ipc}"
  uv run python delt.py --ipc "$ipc" --init noise --no-early-late --milestone 0 --jitter 4 --out "runs/sre2l_digits_ipc${ipc}"
done
