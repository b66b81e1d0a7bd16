"""Answer a question about an image (or caption it) with a model trained by this project.

  python -m lavis_ademvl.predict --cfg-path projects/ademvl/demo/sqa_smollm2.yaml \
      --checkpoint output/.../checkpoint_0.pth --image x.png --question "What shape is it?" --choices circle square

The config is the one the checkpoint was trained with. Multiple-choice (`scienceqa_mc`) models need --choices and
answer with a letter and its choice; other models answer the question with the config's VQA prompt, or caption the
image when no question is given.
"""
from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

import lavis_ademvl  # noqa: F401  (registers processors)
from lavis_ademvl.common.images import load_image
from lavis_ademvl.common.inference import load_for_inference
from lavis_ademvl.datasets.datasets.scienceqa_datasets import ANSWER_CUE, build_prompt, option_letters
from lavis_ademvl.tasks.scienceqa import first_capital_letter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lavis_ademvl.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", required=True, help="the training config of the checkpoint")
    parser.add_argument("--checkpoint", help="checkpoint_*.pth written by lavis_ademvl.train (default: none)")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--question", help="question; none: caption the image")
    parser.add_argument("--choices", nargs="+", help="answer options, for multiple-choice models")
    parser.add_argument("--context", default="", help="hint text of a multiple-choice question")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--options", nargs="+", default=[], help="config overrides, key=value")
    return parser.parse_args(argv)


def predict(args: argparse.Namespace) -> str:
    image = load_image(args.image)  # fail on a bad image before loading any weights
    model, processor, config = load_for_inference(args.cfg_path, args.checkpoint, args.options, args.device)
    samples: dict[str, Any] = {"image": processor(image).unsqueeze(0).to(model.device), "has_image": torch.ones(1, dtype=torch.long)}
    task = config.run.get("task", "")
    if task == "scienceqa_mc":
        if not args.question or not args.choices:
            raise ValueError("this checkpoint answers multiple-choice questions: give --question and --choices")
        problem = {"question": args.question, "choices": args.choices, "hint": args.context}
        samples.update(text_input=[build_prompt(problem, config.datasets.scienceqa_mc.get("prompt_format", "QCM-A"))],
                       answer_cue=ANSWER_CUE)
        method = config.run.get("inference_method", "generate")
        letters = option_letters(len(args.choices))
        if method == "rank":
            letter = model.predict_answers(samples, inference_method="rank", answer_list=[[f" {l}." for l in letters]])[0]
        else:
            letter = model.predict_answers(samples, inference_method="generate", num_beams=1, max_len=1)[0]
        letter = first_capital_letter(letter)
        return f"({letter}) {args.choices[letters.index(letter)]}" if letter in letters else f"no option chosen ({letter!r})"
    if args.choices:
        raise ValueError(f"--choices is for multiple-choice models; this config's task is {task!r}")
    num_beams, max_len = int(config.run.get("num_beams", 5)), int(config.run.get("max_len", 30))
    if args.question:
        samples["text_input"] = [args.question]
        prompt = config.run.get("prompt") or None
        return model.predict_answers(samples, inference_method="generate", num_beams=num_beams, max_len=max_len, prompt=prompt)[0]
    return model.generate(samples, num_beams=num_beams, max_length=max_len, min_length=int(config.run.get("min_len", 1)))[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        print(predict(args))
    except (FileNotFoundError, ValueError, KeyError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
