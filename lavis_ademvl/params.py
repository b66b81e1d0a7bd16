"""Parameter report of an ADEM-VL config, without downloading or allocating any weight.

  python -m lavis_ademvl.params --cfg-path projects/ademvl/sqa.yaml [--options model.fusion=prefix ...]

The model is built on PyTorch's meta device from configurations only: a local folder's config.json, a
`llm_config`/`vision_config` dict, or the built-in shapes of the checkpoints the paper uses.
"""
from __future__ import annotations

import argparse
import sys

import lavis_ademvl  # noqa: F401
from lavis_ademvl.common.inference import load_config
from lavis_ademvl.models.ademvl import AdemVL

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
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lavis_ademvl.params", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", required=True)
    parser.add_argument("--options", nargs="+", default=[])
    args = parser.parse_args(argv)
    try:
        config = load_config(args.cfg_path, args.options)
        print(report(AdemVL.on_meta_device(config.model)))
    except (KeyError, ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
