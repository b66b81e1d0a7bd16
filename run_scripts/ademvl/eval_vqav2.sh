#!/usr/bin/env bash
# Evaluate an ADEM-VL vqav2 checkpoint (projects/ademvl/eval/vqav2.yaml).
#   VQA_ROOT=/data/vqav2 CKPT=output/ademvl/vqav2/<job>/checkpoint_best.pth bash run_scripts/ademvl/eval_vqav2.sh
set -euo pipefail
: "${VQA_ROOT:?set VQA_ROOT}"
: "${CKPT:?set CKPT to a checkpoint written by lavis_ademvl.train}"
torchrun --nproc_per_node "${NPROC:-8}" -m lavis_ademvl.evaluate --cfg-path projects/ademvl/eval/vqav2.yaml \
    --options datasets.coco_vqa.build_info.data_root="$VQA_ROOT" model.finetuned="$CKPT" "$@"
