#!/usr/bin/env bash
# DM-KD on CIFAR-100 (README table; no released script): DiT ImageNet-class images resized to 32 px, as the
# official CIFAR-100 loader does (--class-map spread deals all 1000 ImageNet classes over the 100 folders;
# KD never reads the folder labels), then KD with the train_student.py defaults: 240 epochs, SGD 0.1,
# milestones 150/180/210, wd 5e-4, T=4. The data amount is unpublished: 50K (500 per class) is our reading.
set -euo pipefail
DATA="${DATA:?set DATA to the CIFAR-100 download folder}"
TEACHER="${TEACHER:?set TEACHER to a CIFAR-100 resnet18_modified checkpoint}"
for ipc in 100 500; do
  uv run python dmkd.py --dataset cifar100 --data-path "$DATA" --ipc $ipc --class-map spread \
    --teacher resnet18_modified --teacher-path "$TEACHER" --student resnet18_modified \
    --out "runs/dmkd_cifar100_ipc${ipc}"
done
