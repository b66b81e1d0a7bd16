#!/usr/bin/env bash
# ADEM-VL instruction tuning with the paper's recipe: 8 GPUs x batch 2 x accum 2 = effective batch 32, 15 epochs.
#   INSTRUCT_ROOT=/data/instruct bash run_scripts/ademvl/train_instruct.sh [extra --options ...]
# INSTRUCT_ROOT holds all_data.json, images/train/ and cocoimages/train/; CONFIG=projects/ademvl/instruct_13b.yaml
# for LLaMA-13B.
set -euo pipefail
: "${INSTRUCT_ROOT:?set INSTRUCT_ROOT to the folder holding all_data.json, images/train/ and cocoimages/train/}"
NPROC=${NPROC:-8}
CONFIG=${CONFIG:-projects/ademvl/instruct.yaml}
torchrun --nproc_per_node "$NPROC" -m lavis_ademvl.train \
    --cfg-path "$CONFIG" \
    --options datasets.ademvl_instruct.build_info.data_root="$INSTRUCT_ROOT" "$@"
