#!/usr/bin/env bash
# ADEM-VL on gqa (projects/ademvl/gqa.yaml), 8 GPUs x batch 2 x accum 2.
#   GQA_ROOT=/data/gqa bash run_scripts/ademvl/train_gqa.sh [extra --options ...]
set -euo pipefail
: "${GQA_ROOT:?set GQA_ROOT to the data root described in projects/ademvl/gqa.yaml}"
torchrun --nproc_per_node "${NPROC:-8}" -m lavis_ademvl.train --cfg-path projects/ademvl/gqa.yaml \
    --options datasets.gqa.build_info.data_root="$GQA_ROOT" "$@"
