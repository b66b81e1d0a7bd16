"""Parameter report of an ADEM-VL config, and the GPU memory a training rank needs, without downloading or
allocating any weight.

  ademvl params --cfg-path projects/ademvl/sqa.yaml [--options model.fusion=prefix ...]
  ademvl params --model-type llama3_70b [--gpus 8] [--batch-size 4] [--length 512]

The model is built on PyTorch's meta device from configurations only: a local folder's config.json, a
`llm_config`/`vision_config` dict, or the built-in shapes of the checkpoints our model types name. The memory per GPU
is predicted for run.distributed_strategy ddp and fsdp (models/gpu_memory.py says what is counted); the batch is the
config's run.batch_size_train and the length its model.max_len unless given.
"""
from __future__ import annotations

import sys

from omegaconf import OmegaConf

import lavis_ademvl  # noqa: F401
from lavis_ademvl.common.cli import add_options_argument, entry_point, tool_parser
from lavis_ademvl.common.config_files import load_experiment
from lavis_ademvl.models.ademvl import AdemVL
from lavis_ademvl.models.gpu_memory import predict_training_memory

PARSER = tool_parser("params", __doc__, experiment=False)
_SOURCE = PARSER.add_mutually_exclusive_group(required=True)
_SOURCE.add_argument("--cfg-path", help="experiment config (yaml, may use `includes:`)")
_SOURCE.add_argument("--model-type", help=f"an ademvl model type alone: {', '.join(sorted(AdemVL.PRETRAINED_MODEL_CONFIG_DICT))}")
add_options_argument(PARSER)
PARSER.add_argument("--gpus", type=int, default=8, help="GPUs the frozen towers are sharded over under fsdp (default 8)")
PARSER.add_argument("--batch-size", type=int, help="sequences per GPU and step (default: run.batch_size_train, else 4)")
PARSER.add_argument("--length", type=int, help="tokens per sequence (default: model.max_len)")
GIB = 2**30

GROUPS = {
    "visual_key_offset": "E1 (key offset)",
    "visual_value_offset": "E2 (value offset)",
    "visual_proj": "low-rank projection W'",
    "cls_proj": "[cls] projection",
    "vision_adapters": "vision adapters",
}


def report(model: AdemVL) -> str:
    counts = model.parameter_counts()
    lines = ["trainable parameters:"]
    for group, label in GROUPS.items():
        if f"trainable/{group}" in counts:
            lines.append(f"  {label:<28} {counts[f'trainable/{group}']:>15,}")
    lines.append(f"  {'total trainable':<28} {counts['trainable']:>15,}")
    llm = sum(p.numel() for p in model.llm.parameters())
    lines.append("frozen parameters:")
    lines.append(f"  {'LLM':<28} {llm:>15,}")
    if model.vision_tower is not None:
        vision = sum(p.numel() for p in model.vision_tower.parameters())
        lines.append(f"  {'vision tower (blocks used)':<28} {vision:>15,}")
    lines.append(f"{'total':<30} {counts['total']:>15,}")
    if model.fusion_memory is not None:
        lines.append(f"{'fused decoder layers':<30} {len(model.decoder_layers()):>15,}")
    return "\n".join(lines)


def memory_report(model: AdemVL, batch: int, length: int, gpus: int) -> str:
    """The predicted GiB per GPU of a training step under each strategy (`gpu_memory.predict_training_memory`)."""
    predicted = predict_training_memory(model, batch, length, gpus)
    lines = [f"predicted GPU memory per rank, training, {batch} x {length} tokens with images, frozen towers in "
             f"{model.config.llm_dtype} (GiB; CUDA context and allocator cache not included):",
             f"  {'strategy':<16} {'frozen towers':>14} {'gathered units':>15} {'trainable+AdamW':>16} "
             f"{'activations':>12} {'total':>8}"]
    for strategy, memory in predicted.items():
        label = f"fsdp, {gpus} GPUs" if strategy == "fsdp" else strategy
        lines.append(f"  {label:<16} {memory.frozen / GIB:>14.2f} {memory.gathered / GIB:>15.2f} "
                     f"{memory.trainable / GIB:>16.2f} {memory.activations / GIB:>12.2f} {memory.total / GIB:>8.2f}")
    return "\n".join(lines)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = PARSER.parse_args(argv)
    for name in ("gpus", "batch_size", "length"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')}={getattr(args, name)} must be at least 1")
    # A model type alone is an experiment of one `model:` section, which the loader fills from the type's yaml.
    experiment = args.cfg_path or OmegaConf.create({"model": {"arch": "ademvl", "model_type": args.model_type}})
    config = load_experiment(experiment, args.options).config
    model = AdemVL.on_meta_device(config.model)
    print(report(model))
    batch = args.batch_size or int((config.get("run") or {}).get("batch_size_train") or 4)
    print(memory_report(model, batch, args.length or model.config.max_len, args.gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
