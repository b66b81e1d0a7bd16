"""Drop maps (paper Fig. 3): which visual features the adaptive drop keeps, at each scale, beside the image.

  python -m lavis_ademvl.visualize --cfg-path CONFIG [--checkpoint CKPT] --image x.png --question "..." \
      [--choices A B ...] [--layer all|N] --out maps.png

For each decoder layer the text tokens' attention scores over the Nv visual features are thresholded as in
training; a map cell shows the fraction of (text token, layer) pairs that keep that feature. The input is built as
`predict` builds it (multiple-choice configs need --choices, and the chosen option is printed too).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

import lavis_ademvl  # noqa: F401  (registers processors)
from lavis_ademvl.common.images import load_image
from lavis_ademvl.common.inference import MULTIPLE_CHOICE_TASK, load_for_inference, question_batch
from lavis_ademvl.models.ademvl import AdemVL
from lavis_ademvl.models.fusion import activate, kept_mask
from lavis_ademvl.tasks.scienceqa import answer_questions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lavis_ademvl.visualize", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", required=True)
    parser.add_argument("--checkpoint")
    parser.add_argument("--image", required=True)
    parser.add_argument("--question", default="", help="question (default: none, the model's prompt alone)")
    parser.add_argument("--choices", nargs="+", help="answer options, for multiple-choice models")
    parser.add_argument("--context", default="", help="hint text of a multiple-choice question")
    parser.add_argument("--caption", default="", help="image caption for the context, when the config uses captions")
    parser.add_argument("--layer", default="all", help="'all' (average over decoder layers) or a layer index")
    parser.add_argument("--out", required=True, help="PNG file to write")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--options", nargs="+", default=[])
    return parser.parse_args(argv)


@torch.no_grad()
def kept_masks(model: AdemVL, samples: dict) -> torch.Tensor:
    """[layers, T, Nv] boolean: the visual features each text token keeps in each decoder layer (sample 0)."""
    if model.fusion != "adem":
        raise ValueError(f"drop maps need fusion='adem' (the config has fusion={model.fusion!r})")
    config = model.config
    masks: list[torch.Tensor] = []

    def observe(layer: int, query: torch.Tensor, keys: torch.Tensor) -> None:
        scores = torch.matmul(activate(query, config.activation), keys.transpose(-1, -2))
        masks.append(kept_mask(scores, config.drop_ratio)[0])

    handles = model.fusion_memory.observe_queries(observe)
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


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        image = load_image(args.image)
        model, processor, config = load_for_inference(args.cfg_path, args.checkpoint, args.options, args.device)
        num_layers = len(model.decoder_layers())
        if args.layer != "all" and not (args.layer.isdigit() and int(args.layer) < num_layers):
            raise ValueError(f"--layer {args.layer!r}: give 'all' or 0..{num_layers - 1}")
        samples = question_batch(config, processor, image, args.question, args.choices, args.context, args.caption)
        samples["image"] = samples["image"].to(model.device)
        masks = kept_masks(model, samples)
        draw(image, masks, model.config.down_sample_num, args.layer, Path(args.out))
        if config.run.get("task", "") == MULTIPLE_CHOICE_TASK:
            outputs, predictions = answer_questions(model, samples, config.run.get("inference_method", "generate"))
            print(f"answer: {predictions[0] or 'none'} ({outputs[0]!r})")
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
