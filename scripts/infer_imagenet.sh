#!/usr/bin/env bash
# INFER (UFC) on ImageNet-1k, Table 2 settings (zhangxin-xd/UFC@83d19f8:README.md, ufc_generation/ufc_imgnet.py): torchvision resnet18,
# mobilenet_v2 and efficientnet_b0 teachers (IMAGENET1K_V1 weights), T 2000, lr 0.25, r_bn 0.01,
# batch-shared crop + flip + roll 32; the 9*3 (IPC 10) or 49*3 (IPC 50) UFCs are sharded over GPUs.
# Images are saved as the official code saves them: JPEG quality 75 of truncated pixels (--format jpg).
# Set DATA to the ImageNet root (train/ and val/), NPROC to the number of GPUs (default 8).
set -euo pipefail
DATA="${DATA:?set DATA to the ImageNet root holding train/ and val/}"
NPROC="${NPROC:-8}"
for ipc in 10 50; do
  uv run torchrun --nproc_per_node "$NPROC" infer_ufc.py --dataset imagenet --data-path "$DATA" --ipc "$ipc" \
    --format jpg --out "runs/infer_ufc_imagenet_ipc${ipc}"
  uv run torchrun --nproc_per_node "$NPROC" validate_fkd.py --dataset imagenet --data-path "$DATA" \
    --syn-data-path "runs/infer_ufc_imagenet_ipc${ipc}" --protocol static --teacher resnet18,mobilenet_v2,efficientnet_b0 \
    --student resnet18 --baseline random --baseline-ipc "$ipc"
done
