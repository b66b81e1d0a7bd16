#!/usr/bin/env bash
# ADEM-VL on coco_caption (projects/ademvl/coco_caption.yaml), 8 GPUs x batch 2 x accum 2.
#   COCO_ROOT=/data/coco_caption bash run_scripts/ademvl/train_coco_caption.sh [extra --options ...]
set -euo pipefail
: "${COCO_ROOT:?set COCO_ROOT to the data root described in projects/ademvl/coco_caption.yaml}"
torchrun --nproc_per_node "${NPROC:-8}" -m lavis_ademvl.train --cfg-path projects/ademvl/coco_caption.yaml \
    --options datasets.coco_caption.build_info.data_root="$COCO_ROOT" "$@"
