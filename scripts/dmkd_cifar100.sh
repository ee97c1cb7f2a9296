#!/usr/bin/env bash
# DM-KD on CIFAR-100 (README table; no released script): DiT ImageNet-class images resized to 32 px, as the
# official CIFAR-100 loader does (--class-map spread deals all 1000 ImageNet classes over the 100 folders;
# KD never reads the folder labels), then KD with the train_student.py defaults: 240 epochs, SGD 0.1,
# milestones 150/180/210, wd 5e-4, T=4. The data amount is unpublished: 50K (500 per class) is our reading.
# The table's pairs in DM-KD's own nets (zhengli97/DM-KD@bbab9ce:models/): RN-34 -> RN-18 by default;
# PAIRS="wrn_40_2:wrn_16_1 wrn_40_2:wrn_40_1 wrn_40_2:wrn_16_2" with TEACHER a WRN-40-2 checkpoint. --eval
# writes eval_rded.json through validate_fkd.py with the same recipe.
set -euo pipefail
DATA="${DATA:?set DATA to the CIFAR-100 download folder}"
TEACHER="${TEACHER:?set TEACHER to the DM-KD CIFAR-100 teacher checkpoint (cifarresnet34 by default)}"
PAIRS="${PAIRS:-cifarresnet34:cifarresnet18}"
for pair in $PAIRS; do
  for ipc in 100 500; do
    uv run python dmkd.py --dataset cifar100 --data-path "$DATA" --ipc $ipc --class-map spread \
      --teacher "${pair%%:*}" --teacher-path "$TEACHER" --student "${pair##*:}" --eval \
      --out "runs/dmkd_cifar100_ipc${ipc}_${pair%%:*}_${pair##*:}"
  done
done
