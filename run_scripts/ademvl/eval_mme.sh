#!/usr/bin/env bash
# Evaluate an instruction-tuned ADEM-VL checkpoint zero-shot on MME (perception and cognition), as the authors'
# eval_mme.py does, scored as MME's calculation.py scores it.
#   MME_ROOT=/data/MME_Benchmark_release_version CKPT=output/ademvl/instruct/<job>/checkpoint_14.pth \
#       bash run_scripts/ademvl/eval_mme.sh
set -euo pipefail
: "${MME_ROOT:?set MME_ROOT to the MME_Benchmark_release_version folder}"
: "${CKPT:?set CKPT to a checkpoint of projects/ademvl/instruct.yaml or the authors checkpoint_7B_instruction.pth}"
NPROC=${NPROC:-8}
torchrun --nproc_per_node "$NPROC" -m lavis_ademvl.evaluate \
    --cfg-path projects/ademvl/eval/mme.yaml \
    --options datasets.ademvl_mme.build_info.data_root="$MME_ROOT" model.finetuned="$CKPT" "$@"
