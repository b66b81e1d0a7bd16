#!/usr/bin/env bash
# ADEM-VL on vqav2 (projects/ademvl/vqav2.yaml), 8 GPUs x batch 2 x accum 2.
#   VQA_ROOT=/data/vqav2 bash run_scripts/ademvl/train_vqav2.sh [extra --options ...]
set -euo pipefail
: "${VQA_ROOT:?set VQA_ROOT to the data root described in projects/ademvl/vqav2.yaml}"
torchrun --nproc_per_node "${NPROC:-8}" -m lavis_ademvl.train --cfg-path projects/ademvl/vqav2.yaml \
    --options datasets.coco_vqa.build_info.data_root="$VQA_ROOT" "$@"
