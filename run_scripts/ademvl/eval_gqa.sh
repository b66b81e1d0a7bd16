#!/usr/bin/env bash
# Evaluate an ADEM-VL gqa checkpoint (projects/ademvl/eval/gqa.yaml).
#   GQA_ROOT=/data/gqa CKPT=output/ademvl/gqa/<job>/checkpoint_best.pth bash run_scripts/ademvl/eval_gqa.sh
set -euo pipefail
: "${GQA_ROOT:?set GQA_ROOT}"
: "${CKPT:?set CKPT to a checkpoint written by lavis_ademvl.train}"
torchrun --nproc_per_node "${NPROC:-8}" -m lavis_ademvl.evaluate --cfg-path projects/ademvl/eval/gqa.yaml \
    --options datasets.gqa.build_info.data_root="$GQA_ROOT" model.finetuned="$CKPT" "$@"
