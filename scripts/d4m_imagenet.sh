#!/usr/bin/env bash
# D4M on ImageNet-1K, the paper's Table 2 settings (official distillation/gen_*_imgnt.sh, matching/matching.sh,
# validate/train_FKD.sh; presets in d4m.py): SD v1.5, 512 px latents, km_expand 1, strength 0.7, guidance 8,
# 50 PNDM steps, 224 px output; TTM soft labels from torchvision's ResNet-18 for 300 epochs (batch 1024);
# students ResNet-18/50/101 replay them (fkd protocol: T=20, AdamW 1e-3, cosine, no T^2).
# Set DATA; MODEL may name a local SD v1.5 folder (offline machines); NPROC shards classes over GPUs.
set -euo pipefail
DATA="${DATA:?set DATA to the ImageNet root holding train/ and val/}"
MODEL="${MODEL:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
NPROC="${NPROC:-1}"
for ipc in 10 50 100 200; do
  out="runs/d4m_imagenet_ipc${ipc}"
  uv run torchrun --standalone --nproc_per_node "$NPROC" d4m.py --dataset imagenet --data-path "$DATA" \
    --model "$MODEL" --ipc "$ipc" --out "$out" --eval --eval-student resnet18
  for student in resnet50 resnet101; do
    uv run torchrun --standalone --nproc_per_node "$NPROC" validate_fkd.py --syn-data-path "$out" \
      --dataset imagenet --data-path "$DATA" --protocol fkd --student "$student" --teacher resnet18 \
      --out "$out/eval_fkd_${student}.json"
  done
done
