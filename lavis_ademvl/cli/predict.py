"""Answer a question about an image (or caption it) with a trained ADEM-VL, exactly as its evaluation would.

  ademvl predict --cfg-path projects/ademvl/demo/sqa_smollm2.yaml \
      --checkpoint output/.../checkpoint_0.pth --image x.png --question "What shape is it?" --choices circle square

An instruction-tuned model (projects/ademvl/instruct.yaml, eval/mme.yaml, the authors' checkpoint_7B_instruction.pth)
follows a free-form instruction about an image, or a text-only one without --image:

  ademvl predict --cfg-path projects/ademvl/authors/mme_7b.yaml --image x.jpg \
      --instruction "Describe this image."

The config is the one the checkpoint was trained or evaluated with; without --checkpoint (and none in the config) the
untrained model is refused, as `ademvl evaluate` refuses it (`--options run.allow_untrained=true` to mean it).
Multiple-choice (`scienceqa_mc`) models need --choices (--image is optional: a question without image, as in
ScienceQA) and print the chosen option; the sample is built and answered by the same code as the task's evaluation
(prompt style, text and image processors, answer format, inference method). An --instruction is asked as the MME task
asks its questions ("Instruction: ...\nResponse:", greedy, run.max_len new tokens). Other models answer the question
with the config's VQA prompt, or caption the image when no question is given.
"""
from __future__ import annotations

import sys

import lavis_ademvl  # noqa: F401  (registers processors)
from lavis_ademvl.common.cli import entry_point
from lavis_ademvl.inference import answer, load_for_question, question_batch, question_parser, read_question

PARSER = question_parser("predict", __doc__)


@entry_point
def main(argv: list[str] | None = None) -> int:
    args = PARSER.parse_args(argv)
    question = read_question(args)
    model, processor, config = load_for_question(args)
    print(answer(model, question_batch(config, processor, question), config, question).text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
