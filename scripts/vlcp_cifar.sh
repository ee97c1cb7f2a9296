#!/usr/bin/env bash
# VLCP on CIFAR-10 / CIFAR-100 (VLCP:run_cifar10.sh): SD fine-tuned at 32 px, contamination 0,
# threshold 0.3 (C10) / 0.2 (C100), 32 px output, RDED evaluation with RDED's ResNet-18-modified
# teacher checkpoint (TEACHER). IPC 10/20/50 share the captions and the fine-tuned model.
set -euo pipefail
DATASET="${DATASET:-cifar10}"
DATA="${DATA:?set DATA to the CIFAR download folder}"
TEACHER="${TEACHER:?set TEACHER to the RDED teacher checkpoint, e.g. cifar10_resnet18_modified.pth}"
NPROC="${NPROC:-1}"
for ipc in 10 20 50; do
  uv run torchrun --standalone --nproc_per_node "$NPROC" vlcp.py --dataset "$DATASET" --data-path "$DATA" \
    --ipc "$ipc" --captions "runs/vlcp_${DATASET}/captions.jsonl" --finetuned "runs/vlcp_${DATASET}/sd" \
    --out "runs/vlcp_${DATASET}/ipc${ipc}" --eval --eval-teacher-path "$TEACHER"
done
