#!/usr/bin/env bash
# DELT on the datasets of the paper's table without published synthesis settings (CIFAR-10, Tiny,
# ImageNette, ImageNet-100): the ImageNet-1K values (presets in delt.py, "not published: our choice")
# with the RDED teacher checkpoints (--norm imagenet: RDED trained them on ImageNet statistics).
# Images are saved as the official code saves them: JPEG quality 75 of truncated pixels (--format jpg).
# Set DATASET (cifar10|cifar100|tiny|imagenette|imagewoof|imagenet100), DATA and TEACHER.
set -euo pipefail
DATASET="${DATASET:?set DATASET, e.g. cifar10}"
DATA="${DATA:?set DATA to the dataset root}"
TEACHER="${TEACHER:?set TEACHER to the RDED teacher checkpoint (.pth)}"
for ipc in 1 10 50; do
  uv run python delt.py --dataset "$DATASET" --data-path "$DATA" --teacher-path "$TEACHER" --norm imagenet \
    --ipc "$ipc" --iterations 4000 --round-itr 500 --format jpg --out "runs/delt_${DATASET}_ipc${ipc}" --eval
done
