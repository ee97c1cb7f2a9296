#!/usr/bin/env bash
# VLCP on ImageNet-1K (README figure Image1K.png): IPC 10 and 50, 224 px output, RDED evaluation
# (ResNet-18, torchvision weights as teacher). Captioning all 1.28M images with LLaVA-7B is the
# expensive part: set CAPTIONS to the authors' metadata.jsonl (VLCP issue #7) to reuse it; images
# without a caption in it are captioned. Fine-tuning is shared by both IPCs; reruns resume.
set -euo pipefail
DATA="${DATA:?set DATA to the ImageNet root holding train/ and val/}"
CAPTIONS="${CAPTIONS:-runs/vlcp_imagenet/captions.jsonl}"
SD="${SD:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
NPROC="${NPROC:-8}"
for ipc in 10 50; do
  uv run torchrun --standalone --nproc_per_node "$NPROC" vlcp.py --dataset imagenet --data-path "$DATA" \
    --ipc "$ipc" --model "$SD" --captions "$CAPTIONS" --finetuned runs/vlcp_imagenet/sd \
    --out "runs/vlcp_imagenet/ipc${ipc}" --eval
done
