#!/usr/bin/env bash
# VLCP on ImageNette / ImageWoof / ImageNet-100 (VLCP:run_nette.sh): LLaVA captions once per dataset,
# one SD fine-tune per seed (0, 1, 2; 8 epochs, 512 px, batch 32x4), prototypes and synthesis per IPC,
# Minimax evaluation (hard labels, ResNetAP-10) via validate_fkd.py. Reruns resume every stage.
# Multi-GPU: set NPROC (captioning, fine-tuning, encoding and synthesis are sharded over processes).
set -euo pipefail
DATASET="${DATASET:-imagenette}"
DATA="${DATA:?set DATA to the dataset root holding train/ and val/}"
SD="${SD:-stable-diffusion-v1-5/stable-diffusion-v1-5}"
LLAVA="${LLAVA:-llava-hf/llava-1.5-7b-hf}"
NPROC="${NPROC:-1}"
WORK="runs/vlcp_${DATASET}"
for seed in 0 1 2; do
  for ipc in 10 20 50; do
    uv run torchrun --standalone --nproc_per_node "$NPROC" vlcp.py --dataset "$DATASET" --data-path "$DATA" \
      --ipc "$ipc" --seed "$seed" --model "$SD" --captioner "$LLAVA" --captions "$WORK/captions.jsonl" \
      --finetuned "$WORK/sd_seed${seed}" --out "$WORK/ipc${ipc}_seed${seed}" --eval
  done
done
