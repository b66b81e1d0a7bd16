#!/usr/bin/env bash
# Evaluate an ADEM-VL ScienceQA checkpoint on the 4,241 test questions (Table I columns), as the authors' eval_sqa.py
# does (SQA_ROOT needs captions.json).
#   SQA_ROOT=/data/scienceqa CKPT=output/ademvl/sqa/<job>/checkpoint_19.pth bash run_scripts/ademvl/eval_sqa.sh
set -euo pipefail
: "${SQA_ROOT:?set SQA_ROOT}"
: "${CKPT:?set CKPT to a checkpoint written by lavis_ademvl.train or released by the authors}"
NPROC=${NPROC:-8}
torchrun --nproc_per_node "$NPROC" -m lavis_ademvl.evaluate \
    --cfg-path projects/ademvl/eval/sqa.yaml \
    --options datasets.scienceqa_mc.build_info.data_root="$SQA_ROOT" model.finetuned="$CKPT" "$@"
