#!/usr/bin/env bash
# Evaluate an instruction-tuned ADEM-VL checkpoint zero-shot on MMBench dev with circular evaluation.
#   MMBENCH_TSV=/data/mmbench_dev_20230712.tsv CKPT=checkpoint_7B_instruction.pth bash run_scripts/ademvl/eval_mmbench.sh
set -euo pipefail
: "${MMBENCH_TSV:?set MMBENCH_TSV to MMBench's dev TSV}"
: "${CKPT:?set CKPT to a checkpoint of projects/ademvl/instruct.yaml or the authors checkpoint_7B_instruction.pth}"
NPROC=${NPROC:-8}
torchrun --nproc_per_node "$NPROC" -m lavis_ademvl.evaluate \
    --cfg-path projects/ademvl/eval/mmbench.yaml \
    --options datasets.ademvl_mmbench.build_info.tsv="$MMBENCH_TSV" model.finetuned="$CKPT" "$@"
