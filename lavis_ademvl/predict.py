"""Answer a question about an image (or caption it) with a trained ADEM-VL, exactly as its evaluation would.

  python -m lavis_ademvl.predict --cfg-path projects/ademvl/demo/sqa_smollm2.yaml \
      --checkpoint output/.../checkpoint_0.pth --image x.png --question "What shape is it?" --choices circle square

The config is the one the checkpoint was trained or evaluated with. Multiple-choice (`scienceqa_mc`) models need
--choices (--image is optional: a question without image, as in ScienceQA) and print the chosen option; the sample is
built and answered by the same code as the task's evaluation (prompt style, text and image processors, answer format,
inference method). Other models answer the question with the config's VQA prompt, or caption the image when no
question is given.
"""
from __future__ import annotations

import argparse
import sys

import lavis_ademvl  # noqa: F401  (registers processors)
from lavis_ademvl.common.images import load_image
from lavis_ademvl.common.inference import MULTIPLE_CHOICE_TASK, load_for_inference, question_batch
from lavis_ademvl.tasks.captioning import compile_caption_pattern, extract_caption
from lavis_ademvl.tasks.scienceqa import answer_questions


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lavis_ademvl.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--cfg-path", required=True, help="the training (or evaluation) config of the checkpoint")
    parser.add_argument("--checkpoint", help="a checkpoint written by lavis_ademvl.train or released by the authors")
    parser.add_argument("--image", help="image file (optional for multiple-choice questions)")
    parser.add_argument("--question", help="question; none: caption the image")
    parser.add_argument("--choices", nargs="+", help="answer options, for multiple-choice models")
    parser.add_argument("--context", default="", help="hint text of a multiple-choice question")
    parser.add_argument("--caption", default="", help="image caption for the context, when the config uses captions")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--options", nargs="+", default=[], help="config overrides, key=value")
    return parser.parse_args(argv)


def predict(args: argparse.Namespace) -> str:
    image = load_image(args.image) if args.image else None  # fail on a bad image before loading any weights
    model, processor, config = load_for_inference(args.cfg_path, args.checkpoint, args.options, args.device)
    batch = question_batch(config, processor, image, args.question, args.choices, args.context, args.caption)
    batch["image"] = batch["image"].to(model.device)
    run = config.run
    if run.get("task", "") == MULTIPLE_CHOICE_TASK:
        outputs, predictions = answer_questions(model, batch, run.get("inference_method", "generate"))
        letters = batch["choices"][0]
        if predictions[0] not in letters:
            return f"no option chosen ({outputs[0]!r})"
        return f"({predictions[0]}) {args.choices[letters.index(predictions[0])]}"
    num_beams, max_len = int(run.get("num_beams", 5)), int(run.get("max_len", 30))
    if args.question:
        prompt = run.get("prompt") or None
        return model.predict_answers(batch, inference_method="generate", num_beams=num_beams, max_len=max_len, prompt=prompt)[0]
    caption = model.generate(batch, num_beams=num_beams, max_length=max_len, min_length=int(run.get("min_len", 1)))[0]
    return extract_caption(caption, compile_caption_pattern(run.get("caption_pattern")))  # as the caption task does


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
