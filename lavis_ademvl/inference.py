"""One-off use of a trained ADEM-VL (`predict`, `visualize`): the model from an experiment config and checkpoint, a
question's batch built as the config's evaluation split builds it, and its answer by the task's own answering path.

Each task has an `AnsweringPath`: how one question becomes a batch, and how the model's answer to it is read. The
multiple-choice task `scienceqa_mc` uses its dataset's sample maker and `tasks.scienceqa.answer_questions` (so a
prediction equals the evaluation's); a free-form instruction (`--instruction`, to an instruction-tuned model) is asked
as MME asks its questions ("Instruction: ...\nResponse:", greedy, `run.max_len` new tokens), with or without an image;
every other task uses the open path (a VQA question in the config's prompt, or a caption when no question is given).
A new task with its own protocol adds its path to `ANSWERING_PATHS`.
"""
from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from lavis.common.registry import registry
from omegaconf import DictConfig
from PIL import Image

from lavis_ademvl.common.cli import add_device_argument, tool_parser
from lavis_ademvl.common.config_files import load_experiment
from lavis_ademvl.common.dist import resolve_device
from lavis_ademvl.common.images import load_image
from lavis_ademvl.common.launch import set_model_device, warn_if_other_task
from lavis_ademvl.common.run_config import built_checkpoint, check_run_config
from lavis_ademvl.common.seeding import seed_everything
from lavis_ademvl.datasets.datasets.instruct_datasets import instruction_prompt
from lavis_ademvl.datasets.datasets.scienceqa_datasets import check_problem, collate
from lavis_ademvl.models.ademvl import AdemVL
from lavis_ademvl.tasks.captioning import compile_caption_pattern, extract_caption
from lavis_ademvl.tasks.mme import MAX_NEW_TOKENS, instruction_outputs
from lavis_ademvl.tasks.scienceqa import answer_questions

MULTIPLE_CHOICE_TASK = "scienceqa_mc"


@dataclass
class Question:
    """What a user asks: an image (optional for multiple choice), a question (none: a caption), answer options, and
    for multiple choice the hint (`context`) and the caption captions.json would add."""

    image: Image.Image | None
    text: str | None = None
    choices: list[str] = field(default_factory=list)
    context: str = ""
    caption: str = ""
    instruction: str | None = None


@dataclass
class Answer:
    text: str  # as `predict` prints it
    output: str  # the model's own output
    choice: str = ""  # multiple choice: the chosen option's letter ("" when none)


@dataclass
class AnsweringPath:
    batch: Callable[[DictConfig, Any, Question], dict[str, Any]]
    answer: Callable[[AdemVL, dict[str, Any], DictConfig, Question], Answer]


def question_parser(command: str, doc: str | None) -> argparse.ArgumentParser:
    """The arguments of a tool that asks the model one question (`predict`, `visualize`)."""
    parser = tool_parser(command, doc)
    parser.add_argument("--checkpoint", help="a checkpoint written by lavis_ademvl.train or released by the authors")
    parser.add_argument("--image", help="image file (optional for multiple-choice questions)")
    parser.add_argument("--question", help="question; none: caption the image")
    parser.add_argument("--instruction", help="a free-form instruction to an instruction-tuned model (--image optional)")
    parser.add_argument("--choices", nargs="+", default=[], help="answer options, for multiple-choice models")
    parser.add_argument("--context", default="", help="hint text of a multiple-choice question")
    parser.add_argument("--caption", default="", help="image caption for the context, when the config uses captions")
    add_device_argument(parser)
    return parser


def read_question(args: argparse.Namespace) -> Question:
    """The question of the command line; a bad image fails here, before any weights are loaded."""
    if args.instruction is not None and (args.question or args.choices or args.context or args.caption):
        raise ValueError("--instruction is asked alone: leave out --question, --choices, --context and --caption "
                         "(write a hint or caption into the instruction itself)")
    texts = {"--instruction": args.instruction, "--question": args.question, "--context": args.context,
             "--caption": args.caption, **{f"--choices {n + 1}": choice for n, choice in enumerate(args.choices)}}
    for name, text in texts.items():
        check_utf8_argument(name, text)
    image = load_image(args.image) if args.image else None
    return Question(image, args.question, list(args.choices), args.context, args.caption, args.instruction)


def check_utf8_argument(name: str, text: str | None) -> None:
    """Command-line text is UTF-8: Python keeps other bytes as lone surrogates, which the tokenizer refuses with a
    TypeError naming no argument."""
    if text is None:
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise ValueError(f"{name} is not UTF-8 text: {os.fsencode(text)[:80]!r}; write it in a UTF-8 terminal or "
                         "locale") from error


def load_for_question(args: argparse.Namespace) -> tuple[AdemVL, Any, DictConfig]:
    """`load_for_inference` of a `question_parser` command line, refusing an untrained model (no --checkpoint, and
    none in the config) unless `run.allow_untrained=true`, as evaluation does."""
    return load_for_inference(args.cfg_path, args.checkpoint, args.options, args.device, trained=True)


def load_for_inference(
    cfg_path: str | Path, checkpoint: str | None, options: list[str] | None = None, device: str = "auto",
    trained: bool = False,
) -> tuple[AdemVL, Any, DictConfig]:
    """(model in eval mode on the device, evaluation image processor, merged config); `trained`: a model the config
    or `checkpoint` gives no checkpoint is refused (`run_config.built_checkpoint`).

    The model is built for `device` (its towers load there and compute in that device's dtype), and the random state
    is seeded as `lavis_ademvl.train`/`.evaluate` seed it before building the model."""
    experiment = load_experiment(cfg_path, options or [])
    config = experiment.config
    check_run_config(config.run)  # run.max_len, run.num_beams, ... as the tasks would read them
    if checkpoint is not None:  # instead of the config's own model.finetuned, if any
        config.model.load_finetuned, config.model.finetuned = True, checkpoint
    if trained:
        built_checkpoint(experiment, give="--checkpoint PATH")
    seed_everything(int(config.run.get("seed", 42)))
    device = resolve_device(device, key="--device")
    set_model_device(config.model, device)
    model = AdemVL.from_config(config.model)
    warn_if_other_task(getattr(model, "checkpoint_task", None), config.run.get("task"), config.model.get("finetuned"))
    model = model.to(torch.device(device)).eval()
    return model, eval_image_processor(config), config


def eval_image_processor(config: DictConfig) -> Any:
    """The evaluation image transform of the config's first dataset, else of the model type."""
    processor_cfg = None
    for dataset in (config.get("datasets") or {}).values():
        processor_cfg = (dataset.get("vis_processor") or {}).get("eval")
        break
    processor_cfg = processor_cfg or config.preprocess.vis_processor.eval
    return registry.get_processor_class(processor_cfg.name).from_config(processor_cfg)


def answering_path(config: DictConfig, question: Question) -> AnsweringPath:
    if question.instruction is not None:
        return INSTRUCTION_PATH
    return ANSWERING_PATHS.get(config.run.get("task", ""), OPEN_PATH)


def question_batch(config: DictConfig, processor: Any, question: Question) -> dict[str, Any]:
    """A batch of one sample, as the config's evaluation split would build it."""
    return answering_path(config, question).batch(config, processor, question)


def answer(model: AdemVL, batch: dict[str, Any], config: DictConfig, question: Question) -> Answer:
    """The model's answer to a `question_batch`, read as the config's task reads it."""
    batch["image"] = batch["image"].to(model.device)
    return answering_path(config, question).answer(model, batch, config, question)


# ---------------------------------------------------------------------- multiple choice (scienceqa_mc)


def multiple_choice_batch(config: DictConfig, processor: Any, question: Question) -> dict[str, Any]:
    """Made by the ScienceQA builder's evaluation sample maker (its image and text processors, prompt style and
    format, answer format); `context` is the hint, `caption` what captions.json would add."""
    if not question.text or not question.choices:
        raise ValueError("this config answers multiple-choice questions (task scienceqa_mc): give --question and --choices")
    builder = registry.get_builder_class(MULTIPLE_CHOICE_TASK)(config.datasets[MULTIPLE_CHOICE_TASK])
    builder.checked_build_info()
    if question.caption and not builder.uses_captions(training=False):
        raise ValueError("--caption: this config evaluates without captions (datasets.scienceqa_mc.build_info.use_caption)")
    builder.build_processors()
    problem = {"question": question.text, "choices": list(question.choices), "hint": question.context}
    check_problem(problem, "(--question, --choices)", "the command line", labelled=False)
    return collate([builder.sample_maker(training=False)(problem, question.image, question.caption)])


def answer_multiple_choice(model: AdemVL, batch: dict[str, Any], config: DictConfig, question: Question) -> Answer:
    outputs, predictions = answer_questions(model, batch, config.run.get("inference_method", "generate"))
    letters = batch["choices"][0]
    if predictions[0] not in letters:
        return Answer(f"no option chosen ({outputs[0]!r})", outputs[0])
    return Answer(f"({predictions[0]}) {question.choices[letters.index(predictions[0])]}", outputs[0], predictions[0])


# ---------------------------------------------------------------------- open questions and captions


def open_batch(config: DictConfig, processor: Any, question: Question) -> dict[str, Any]:
    """The image through `processor`, and the question (if any) as text_input."""
    if question.choices:
        raise ValueError(f"--choices is for multiple-choice models; this config's task is {config.run.get('task', '')!r}")
    if question.image is None:
        raise ValueError("give --image")
    batch: dict[str, Any] = {"image": processor(question.image).unsqueeze(0), "has_image": torch.ones(1, dtype=torch.long)}
    if question.text:
        batch["text_input"] = [question.text]
    return batch


def answer_open(model: AdemVL, batch: dict[str, Any], config: DictConfig, question: Question) -> Answer:
    """The question answered with the run's VQA prompt and decoding, or the image captioned as the caption task does."""
    run = config.run
    num_beams, max_len = int(run.get("num_beams", 5)), int(run.get("max_len", 30))
    if question.text:
        prompt = run.get("prompt") or None
        text = model.predict_answers(batch, inference_method="generate", num_beams=num_beams, max_len=max_len, prompt=prompt)[0]
        return Answer(text, text)
    caption = model.generate(batch, num_beams=num_beams, max_length=max_len, min_length=int(run.get("min_len", 1)))[0]
    return Answer(extract_caption(caption, compile_caption_pattern(run.get("caption_pattern"))), caption)


# ---------------------------------------------------------------------- free-form instructions


def instruction_batch(config: DictConfig, processor: Any, question: Question) -> dict[str, Any]:
    """The instruction in the authors' prompt, as the MME dataset writes its questions; without an image, a blank
    placeholder and has_image 0 (the "no image" prefix), as the instruction data's text-only entries."""
    image = question.image if question.image is not None else Image.new("RGB", (224, 224))
    return {"image": processor(image).unsqueeze(0), "has_image": torch.tensor([int(question.image is not None)]),
            "text_input": [instruction_prompt(question.instruction)]}


def answer_instruction(model: AdemVL, batch: dict[str, Any], config: DictConfig, question: Question) -> Answer:
    """Greedy, at most `run.max_len` new tokens (MME's 10 when the config sets none), as the MME task answers."""
    text = instruction_outputs(model, batch, int(config.run.get("max_len", MAX_NEW_TOKENS)))[0]
    return Answer(text, text)


ANSWERING_PATHS: dict[str, AnsweringPath] = {MULTIPLE_CHOICE_TASK: AnsweringPath(multiple_choice_batch, answer_multiple_choice)}
OPEN_PATH = AnsweringPath(open_batch, answer_open)
INSTRUCTION_PATH = AnsweringPath(instruction_batch, answer_instruction)
