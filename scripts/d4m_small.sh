#!/usr/bin/env bash
# D4M on CIFAR-10/100 and Tiny-ImageNet. The official repo has prompt files but no scripts, TTM or
# evaluation for them (suduo94/D4M@da35d10 ships ImageNet scripts only): we keep the ImageNet generation settings, write images at the
# dataset's resolution (32/64 px; the official code writes 224 px) and store TTM labels from the teacher
# checkpoint you pass (CIFAR: a ConvNet-W128 per the authors, issue #7; Tiny: resnet18_modified).
# Set DATASET (cifar10|cifar100|tiny), DATA, TEACHER (checkpoint) and optionally TEACHER_ARCH, MODEL.
set -euo pipefail
DATASET="${DATASET:?set DATASET to cifar10, cifar100 or tiny}"
DATA="${DATA:?set DATA to the dataset root (CIFAR download folder, or Tiny-ImageNet with train/ and val/)}"
TEACHER="${TEACHER:?set TEACHER to the teacher checkpoint used for the TTM soft labels}"
MODEL="${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
NPROC="${NPROC:-1}"
arch=()
if [ -n "${TEACHER_ARCH:-}" ]; then arch=(--teacher "$TEACHER_ARCH"); fi
for ipc in 10 50 100; do
  uv run torchrun --standalone --nproc_per_node "$NPROC" d4m.py --dataset "$DATASET" --data-path "$DATA" \
    --model "$MODEL" --ipc "$ipc" --teacher-path "$TEACHER" "${arch[@]}" \
    --out "runs/d4m_${DATASET}_ipc${ipc}" --eval
done
