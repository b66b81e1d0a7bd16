"""Drop maps (paper Fig. 3): which visual features the adaptive drop keeps, at each scale, beside the image.

  ademvl visualize --cfg-path CONFIG [--checkpoint CKPT] --image x.png --question "..." \
      [--choices A B ...] [--layer all|N] --out maps.png

For each decoder layer the text tokens' attention scores over the Nv visual features are thresholded as in
training; a map cell shows the fraction of (text token, layer) pairs that keep that feature. The input is built as
`predict` builds it (multiple-choice configs need --choices, and the chosen option is printed too).
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

import lavis_ademvl  # noqa: F401  (registers processors)
from lavis_ademvl.common.cli import entry_point
from lavis_ademvl.inference import (
    MULTIPLE_CHOICE_TASK,
    answer,
    load_for_question,
    question_batch,
    question_parser,
    read_question,
)
from lavis_ademvl.models.ademvl import AdemVL

PARSER = question_parser("visualize", __doc__)
PARSER.add_argument("--layer", default="all", help="'all' (average over decoder layers) or a layer index")
PARSER.add_argument("--out", required=True, help="PNG file to write (.png is added when missing)")


@torch.no_grad()
def kept_masks(model: AdemVL, samples: dict) -> torch.Tensor:
    """[layers, T, Nv] boolean: the visual features each text token keeps in each decoder layer (sample 0)."""
    if model.fusion != "adem":
        raise ValueError(f"drop maps need fusion='adem' (the config has fusion={model.fusion!r})")
    masks: list[torch.Tensor] = []
    handles = model.fusion_memory.observe_kept(lambda layer, kept: masks.append(kept[0]))
    try:
        model.next_token_logprobs(samples)
    finally:
        for handle in handles:
            handle.remove()
    return torch.stack(masks)


def draw(image, masks: torch.Tensor, scales: list[int], layer: str, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = masks.float().mean(dim=(0, 1)) if layer == "all" else masks[int(layer)].float().mean(dim=0)
    figure, axes = plt.subplots(1, 1 + len(scales), figsize=(3.2 * (1 + len(scales)), 3.2))
    axes[0].imshow(image)
    axes[0].set_title("image")
    start = 0
    for axis, size in zip(axes[1:], scales):
        side = math.isqrt(size)
        grid = kept[start : start + size].reshape(side, side).cpu().numpy()
        start += size
        shown = axis.imshow(grid, vmin=0.0, vmax=1.0, cmap="viridis")
        axis.set_title(f"{side}x{side}: kept fraction")
        figure.colorbar(shown, ax=axis, fraction=0.046)
    for axis in axes:
        axis.axis("off")
    figure.suptitle(f"adaptive drop, layer {layer}")
    figure.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(out, dpi=100)
    plt.close(figure)


def png_path(out: str) -> Path:
    """The file --out names; a folder is an error (the map needs a file name), a name without .png gets it."""
    path = Path(out)
    if path.is_dir() or out.endswith(("/", "\\")):
        raise ValueError(f"--out {out} is a folder; give the PNG file to write, e.g. {path / 'drop_map.png'}")
    return path if path.suffix.lower() == ".png" else path.with_name(path.name + ".png")


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = PARSER.parse_args(argv)
    if not args.image:
        raise ValueError("give --image: drop maps are drawn over an image")
    out = png_path(args.out)
    question = read_question(args)
    model, processor, config = load_for_question(args)
    num_layers = len(model.decoder_layers())
    if args.layer != "all" and not (args.layer.isdigit() and int(args.layer) < num_layers):
        raise ValueError(f"--layer {args.layer!r}: give 'all' or 0..{num_layers - 1}")
    samples = question_batch(config, processor, question)
    samples["image"] = samples["image"].to(model.device)
    masks = kept_masks(model, samples)
    draw(question.image, masks, model.config.down_sample_num, args.layer, out)
    if config.run.get("task", "") == MULTIPLE_CHOICE_TASK:
        chosen = answer(model, samples, config, question)
        print(f"answer: {chosen.choice or 'none'} ({chosen.output!r})")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
