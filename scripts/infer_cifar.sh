#!/usr/bin/env bash
# INFER (UFC) on CIFAR-10/100, Table 1 settings (zhangxin-xd/UFC@83d19f8:sh/ufc_cifar.sh): T 1000, lr 0.25,
# r_bn 1.0, the four teachers of ufc_cifar.py; static labels 400 epochs, dynamic 400/(M+1) = 80.
# Images are saved as ufc_cifar.py saves them: JPEG quality 75 of truncated pixels (--format jpg).
# Set DATASET (cifar10|cifar100), DATA (CIFAR download folder) and CKPT (a folder holding the four
# teacher checkpoints of the UFC README: resnet18/mobilenetV2/efficientnet/shufflenet_E200/ckpt.pth).
set -euo pipefail
DATASET="${DATASET:?set DATASET to cifar10 or cifar100}"
DATA="${DATA:?set DATA to the CIFAR download folder}"
CKPT="${CKPT:?set CKPT to the folder of the four teacher checkpoints}"
TEACHERS="$CKPT/resnet18_E200/ckpt.pth,$CKPT/mobilenetV2_E200/ckpt.pth,$CKPT/efficientnet_E200/ckpt.pth,$CKPT/shufflenet_E200/ckpt.pth"
IPCS="10 50"; [ "$DATASET" = cifar100 ] && IPCS="10 50 100"
for ipc in $IPCS; do
  OUT="runs/infer_ufc_${DATASET}_ipc${ipc}"
  uv run python infer_ufc.py --dataset "$DATASET" --data-path "$DATA" --teacher-path "$TEACHERS" --ipc "$ipc" \
    --format jpg --out "$OUT" --eval --eval-protocol static --eval-repeats 3 --baseline random
  uv run python infer_ufc.py --dataset "$DATASET" --data-path "$DATA" --teacher-path "$TEACHERS" --ipc "$ipc" \
    --format jpg --out "$OUT" --eval --eval-protocol dynamic --eval-repeats 3
done
