"""Parameter report of an ADEM-VL config, without downloading or allocating any weight.

  ademvl params --cfg-path projects/ademvl/sqa.yaml [--options model.fusion=prefix ...]
  ademvl params --model-type qwen2_5_7b [--options ...]      # a model type's own yaml

The model is built on PyTorch's meta device from configurations only: a local folder's config.json, a
`llm_config`/`vision_config` dict, or the built-in shapes of the checkpoints our model types name.
"""
from __future__ import annotations

import sys

from omegaconf import OmegaConf

import lavis_ademvl  # noqa: F401
from lavis_ademvl.common.cli import add_options_argument, entry_point, tool_parser
from lavis_ademvl.common.config_files import load_experiment
from lavis_ademvl.models.ademvl import AdemVL

PARSER = tool_parser("params", __doc__, experiment=False)
_SOURCE = PARSER.add_mutually_exclusive_group(required=True)
_SOURCE.add_argument("--cfg-path", help="experiment config (yaml, may use `includes:`)")
_SOURCE.add_argument("--model-type", help=f"an ademvl model type alone: {', '.join(sorted(AdemVL.PRETRAINED_MODEL_CONFIG_DICT))}")
add_options_argument(PARSER)

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


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = PARSER.parse_args(argv)
    # A model type alone is an experiment of one `model:` section, which the loader fills from the type's yaml.
    experiment = args.cfg_path or OmegaConf.create({"model": {"arch": "ademvl", "model_type": args.model_type}})
    print(report(AdemVL.on_meta_device(load_experiment(experiment, args.options).config.model)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
