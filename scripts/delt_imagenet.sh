#!/usr/bin/env bash
# DELT on ImageNet-1K with the official synthesis settings (D:scripts/resnet18_imagenet1k_synthesis.sh):
# ResNet-18 teacher, batch 100, lr 0.25, r_bn 0.01, jitter 0, cosine crop curriculum (milestone 1),
# T=4000 with EarlyLate rounds of 500 for IPC 10/50/100; IPC 1 without EarlyLate (the official IPC 1
# scripts sweep T in 1000..4000). Evaluation: RDED protocol + RandAugment (validate_fkd.py, VILA-Lab/DELT@f2f81ca:evaluation/argument.py).
# Images are saved as the official code saves them: JPEG quality 75 of truncated pixels (--format jpg).
# Multi-GPU: set NPROC (classes are sharded over processes; reruns resume).
set -euo pipefail
DATA="${DATA:?set DATA to the ImageNet root holding train/ and val/}"
NPROC="${NPROC:-1}"
for ipc in 1 10 50 100; do
  extra=()
  if [ "$ipc" -eq 1 ]; then extra=(--no-early-late); fi
  uv run torchrun --standalone --nproc_per_node "$NPROC" delt.py --dataset imagenet --data-path "$DATA" \
    --ipc "$ipc" --iterations 4000 --round-itr 500 --format jpg --out "runs/delt_imagenet_ipc${ipc}" --eval "${extra[@]}"
done
