#!/usr/bin/env bash
# ADEM-VL on ScienceQA with the paper's recipe: 8 GPUs x batch 2 x accum 2 = effective batch 32.
#   SQA_ROOT=/data/scienceqa bash run_scripts/ademvl/train_sqa.sh [extra --options ...]
set -euo pipefail
: "${SQA_ROOT:?set SQA_ROOT to the folder holding problems.json, pid_splits.json and images/}"
NPROC=${NPROC:-8}
torchrun --nproc_per_node "$NPROC" -m lavis_ademvl.train \
    --cfg-path projects/ademvl/sqa.yaml \
    --options datasets.scienceqa_mc.build_info.data_root="$SQA_ROOT" "$@"
