#!/usr/bin/env bash
# Evaluate an ADEM-VL coco_caption checkpoint (projects/ademvl/eval/coco_caption.yaml).
#   COCO_ROOT=/data/coco_caption CKPT=output/ademvl/coco_caption/<job>/checkpoint_best.pth bash run_scripts/ademvl/eval_coco_caption.sh
set -euo pipefail
: "${COCO_ROOT:?set COCO_ROOT}"
: "${CKPT:?set CKPT to a checkpoint written by lavis_ademvl.train or released by the authors}"
torchrun --nproc_per_node "${NPROC:-8}" -m lavis_ademvl.evaluate --cfg-path projects/ademvl/eval/coco_caption.yaml \
    --options datasets.coco_caption.build_info.data_root="$COCO_ROOT" model.finetuned="$CKPT" "$@"
