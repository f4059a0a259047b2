#!/usr/bin/env bash
# Every GPU check of OAP training (issue 11) in one run, for a session lent a CUDA device:
#   1. `labelwise bench oap-train --device cuda`: the cpu preset's step and the paper's coco preset
#      (ViT-B/8 + ViT-Adapter, 448 px, batch 16, 50 + 150 queries, K 512, bf16 autocast, random weights),
#      step time, peak GPU memory and the share of the step spent in the teacher / in OAP;
#   2. a 40-step cpu-preset run on CUDA that then predicts (train -> infer --what universal,pseudo).
# Usage: bash bench/oap_train_gpu_check.sh [OUT_DIR]   (writes OUT_DIR/oap_train_gpu.json and logs)
set -euo pipefail
out="${1:-bench}"
mkdir -p "$out"
labelwise bench oap-train --device cuda --steps 10 --warmup 3 --json "$out/oap_train_gpu.json" --no-progress \
  2>&1 | tee "$out/oap_train_gpu.log"
tmp="$(mktemp -d)"
labelwise data synth objects "$tmp/tb" --train 32 --val 8 --size 160
labelwise train oap --data "coco:$tmp/tb" --out "$tmp/run" --preset cpu --steps 40 --set train.device=cuda \
  --no-progress 2>&1 | tail -3 | tee -a "$out/oap_train_gpu.log"
labelwise infer "$tmp/run" --data "coco:$tmp/tb" --split val --out "$tmp/pred" --what universal,pseudo --device cuda \
  --no-progress 2>&1 | tail -2 | tee -a "$out/oap_train_gpu.log"
labelwise evaluate instance --pred "$tmp/pred/universal.json" --gt "coco:$tmp/tb" --split val --no-progress \
  2>&1 | tee -a "$out/oap_train_gpu.log"
