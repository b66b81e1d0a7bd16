"""ADEM-VL as an lmms-eval model: `lmms-eval --model ademvl --model_args cfg_path=<eval yaml>,checkpoint=<ckpt>`.

lmms-eval finds the class through the entry point `ademvl` of group `lmms_eval.models` (setup.cfg, module
lavis_ademvl_lmms_eval). The model is loaded exactly as `ademvl predict` loads it (`inference.load_for_inference`:
any model type and backbone, the authors' checkpoints, `options` as `--options`), and an untrained model is refused
unless `allow_untrained=true` (or `options=run.allow_untrained=true`) says so.

--model_args (comma-separated key=value; lmms-eval adds batch_size and device):
  cfg_path          the experiment config the checkpoint was trained or evaluated with (required)
  checkpoint        the checkpoint (else the config's model.finetuned)
  options           config overrides as `ademvl predict --options` takes them, separated by spaces or ';'
  prompt            `lmms` (default): the task's own prompt text, decoded with the task's generation_kwargs;
                    `ademvl`: the question asked as `ademvl predict` asks it, in the layout the project trains on
                    (multiple choice, ScienceQA and MMBench rows: QCM-A through the config's scienceqa_mc path, the
                    answer its option letter; MME rows: the instruction layout, greedy, run.max_len tokens); a task
                    whose rows are none of these keeps its own prompt
  allow_untrained   true: evaluate a model without checkpoint (its scores are a random model's)
  max_new_tokens    an upper bound on the task's max_new_tokens (none by default)

Each request's image is the first of its `doc_to_visual` list, through the config's evaluation image processor; a
request without image gets the model's no-image input (a blank placeholder, has_image 0: the "Image: N/A" prefix), as
ScienceQA's text-only questions do. `loglikelihood` is the project's rank scoring (`score_candidates`: the summed
log-probability of the continuation's tokens and the closing eos after the context), with lmms-eval's greedy flag.
"""
from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image

import lavis_ademvl  # noqa: F401  (registers the model, processors and builders)
from lavis_ademvl.inference import MULTIPLE_CHOICE_TASK, Question, load_for_inference, question_batch
from lavis_ademvl.tasks.mme import MAX_NEW_TOKENS, instruction_outputs
from lavis_ademvl.tasks.scienceqa import answer_questions

PROMPTS = ("lmms", "ademvl")
PLACEHOLDER_SIZE = 224  # the no-image placeholder, as inference.instruction_batch and the ScienceQA samples make it
DEFAULT_MAX_NEW_TOKENS = 128  # when a task's generation_kwargs name none


def parse_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise ValueError(f"{name} must be true or false, got {value!r}")


def split_options(options: Any) -> list[str]:
    """`options=` of --model_args: config overrides separated by spaces or ';' (commas separate model_args)."""
    if options is None or options == "":
        return []
    if isinstance(options, (list, tuple)):
        return [str(option) for option in options]
    return [part for part in re.split(r"[;\s]+", str(options)) if part]


def batches(indices: Sequence[int], lengths: Sequence[int], keys: Sequence[str], size: int) -> Iterable[list[int]]:
    """Request indices in batches of at most `size`, each batch sharing one key (a task's generation settings),
    longest first within a key (as lmms-eval's models sort: a memory error shows at once, padding is least)."""
    groups: dict[str, list[int]] = {}
    for index in indices:
        groups.setdefault(keys[index], []).append(index)
    for members in groups.values():
        members.sort(key=lambda i: (-lengths[i], i))
        for start in range(0, len(members), size):
            yield members[start : start + size]


def truncate_at(text: str, until: Sequence[str]) -> str:
    """The text before the first of the stop strings `until` it holds."""
    for stop in until:
        if stop:
            text = text.split(stop, 1)[0]
    return text


def _present(value: Any) -> bool:
    """An MMBench cell that holds an option (the hub's rows write a missing one as None, NaN or 'nan')."""
    if value is None:
        return False
    if isinstance(value, float) and math.isnan(value):
        return False
    return str(value).strip() not in ("", "nan")


def ademvl_question(doc: dict, image: Image.Image | None) -> Question | None:
    """The question of an lmms-eval row as `ademvl predict` would be asked it, or None for a row of no known schema.

    - ScienceQA (lmms-lab ScienceQA: question, choices, hint, answer an index): --question --choices --context hint;
    - MMBench (index, question, hint, A-D): --question, the options A, B, ... while present, --context hint;
    - MME (question, answer Yes/No, category, question_id; no options): --instruction question.
    """
    if not isinstance(doc, dict) or not isinstance(doc.get("question"), str):
        return None
    question = doc["question"]
    if isinstance(doc.get("choices"), list):
        return Question(image, question, [str(choice) for choice in doc["choices"]], context=doc.get("hint") or "")
    if "A" in doc and "B" in doc:
        choices = []
        for letter in "ABCDEFGHIJ":
            if letter not in doc or not _present(doc[letter]):
                break
            choices.append(str(doc[letter]))
        hint = doc.get("hint")
        return Question(image, question, choices, context=str(hint) if _present(hint) else "")
    if "category" in doc and "question_id" in doc:
        return Question(image, instruction=question)
    return None


def merged(batches_of_one: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One batch of several one-question batches (their tensors concatenated, their lists joined)."""
    first = batches_of_one[0]
    result: dict[str, Any] = {}
    for key in first:
        values = [batch[key] for batch in batches_of_one]
        if isinstance(values[0], torch.Tensor):
            result[key] = torch.cat(values)
        elif isinstance(values[0], list):
            result[key] = [item for value in values for item in value]
        else:
            result[key] = values[0]
    return result


class AdemVLLmms(lmms):
    """ADEM-VL behind lmms-eval's simple-model interface (`generate_until`, `loglikelihood`)."""

    is_simple = True

    def __init__(
        self,
        cfg_path: str | None = None,
        checkpoint: str | None = None,
        options: Any = None,
        prompt: str = "lmms",
        allow_untrained: Any = False,
        max_new_tokens: Any = None,
        batch_size: Any = 1,
        device: str | None = None,
        max_batch_size: Any = None,  # lmms-eval passes it; only `batch_size` is used
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            raise ValueError(f"unknown --model_args for ademvl: {', '.join(sorted(unknown))} (known: cfg_path, "
                             "checkpoint, options, prompt, allow_untrained, max_new_tokens)")
        if not cfg_path:
            raise ValueError("--model_args needs cfg_path=<the experiment config the checkpoint was trained or "
                             "evaluated with> (and checkpoint=<file>)")
        if prompt not in PROMPTS:
            raise ValueError(f"prompt must be one of {', '.join(PROMPTS)}, got {prompt!r}")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size must be a whole number for ademvl, got {batch_size!r}") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size!r}")
        self.prompt = prompt
        self.max_new_tokens = None if max_new_tokens in (None, "") else int(max_new_tokens)
        overrides = split_options(options)
        if parse_bool("allow_untrained", allow_untrained):
            overrides.append("run.allow_untrained=true")
        self.model, self.image_processor, self.config = load_for_inference(
            cfg_path, None if checkpoint in (None, "") else str(checkpoint), overrides, device or "auto", trained=True
        )
        self.placeholder = Image.new("RGB", (PLACEHOLDER_SIZE, PLACEHOLDER_SIZE))
        self._warned_images = False

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ------------------------------------------------------------------ inputs

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _image(self, doc_to_visual: Callable | None, doc: Any) -> Image.Image | None:
        """The request's first image (None without one)."""
        visuals = doc_to_visual(doc) if doc_to_visual is not None else []
        visuals = [visual for visual in (visuals or []) if visual is not None]
        if len(visuals) > 1 and not self._warned_images:
            logging.warning("ademvl takes one image per question: the first of %d is used", len(visuals))
            self._warned_images = True
        if not visuals:
            return None
        if not isinstance(visuals[0], Image.Image):
            raise ValueError(f"ademvl reads images; this task gives a {type(visuals[0]).__name__} (video or audio?)")
        return visuals[0].convert("RGB")

    def _visual_batch(self, images: Sequence[Image.Image | None]) -> dict[str, torch.Tensor]:
        """Images through the eval image processor, the placeholder (has_image 0) where a request has none."""
        tensors = [self.image_processor(self.placeholder if image is None else image) for image in images]
        return {"image": torch.stack(tensors).to(self.device),
                "has_image": torch.tensor([int(image is not None) for image in images])}

    def _length(self, text: str) -> int:
        return len(self.model.tokenizer(text, add_special_tokens=False).input_ids)

    # ------------------------------------------------------------------ generate_until

    def generate_until(self, requests: list[Instance]) -> list[str]:
        args = [request.args for request in requests]
        answers: list[str | None] = [None] * len(args)
        own, asked = [], {}
        for index, (_, _, doc_to_visual, doc_id, task, split) in enumerate(args):
            question = None
            if self.prompt == "ademvl":
                doc = self._doc(task, split, doc_id)
                question = ademvl_question(doc, self._image(doc_to_visual, doc))
            if question is None:
                own.append(index)
            else:
                asked[index] = question
        if asked:
            self._answer_as_predict(asked, answers)
        lengths = [0] * len(args)
        for index in own:
            lengths[index] = self._length(args[index][0])
        keys = [json.dumps(arg[1], sort_keys=True, default=str) for arg in args]
        for chunk in batches(own, lengths, keys, self.batch_size):
            for index, text in zip(chunk, self._generate([args[i] for i in chunk])):
                answers[index] = text
        return [str(answer) for answer in answers]

    def _generate(self, chunk: list[tuple]) -> list[str]:
        """The task's prompts, decoded with its generation_kwargs (all alike in a chunk)."""
        gen_kwargs = dict(chunk[0][1] or {})
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if self.max_new_tokens is not None:
            max_new = min(max_new, self.max_new_tokens)
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        sample = parse_bool("do_sample", gen_kwargs["do_sample"]) if "do_sample" in gen_kwargs else temperature > 0
        num_beams = int(gen_kwargs.get("num_beams") or 1)
        images = [self._image(doc_to_visual, self._doc(task, split, doc_id))
                  for _, _, doc_to_visual, doc_id, task, split in chunk]
        samples = {**self._visual_batch(images), "text_input": [context for context, *_ in chunk]}
        options: dict[str, Any] = {"num_beams": 1 if sample else num_beams, "max_length": max_new, "prompt": "{}"}
        if sample:
            options.update(use_nucleus_sampling=True, temperature=temperature or 1.0,
                           top_p=float(gen_kwargs.get("top_p") or 1.0))
        outputs = self.model.generate(samples, **options)
        return [truncate_at(output, until).strip() for output in outputs]

    def _answer_as_predict(self, asked: dict[int, Question], answers: list[str | None]) -> None:
        """Questions asked as `ademvl predict` asks them (inference.question_batch), answered in batches by the
        functions `predict` answers through: the multiple-choice task's `answer_questions` (the chosen option's
        letter; the model's output when it names none) and `instruction_outputs` for instructions."""
        config = self.config
        choice_rows = [i for i, q in asked.items() if q.instruction is None]
        if choice_rows and config.run.get("task") != MULTIPLE_CHOICE_TASK:
            raise ValueError(f"prompt=ademvl asks multiple-choice rows as a {MULTIPLE_CHOICE_TASK} config asks them; "
                             f"{config.run.get('task')!r} is this config's task: give such a config, or prompt=lmms")
        instruction_rows = [i for i, q in asked.items() if q.instruction is not None]
        method = config.run.get("inference_method", "generate")
        max_len = int(config.run.get("max_len", MAX_NEW_TOKENS))
        for rows, answer_batch in ((choice_rows, lambda b: self._choices(b, method)),
                                   (instruction_rows, lambda b: instruction_outputs(self.model, b, max_len))):
            lengths = [0] * len(answers)
            for i in rows:
                lengths[i] = self._length(asked[i].text or asked[i].instruction or "")
            for chunk in batches(rows, lengths, ["ademvl"] * len(answers), self.batch_size):
                batch = merged([question_batch(config, self.image_processor, asked[i]) for i in chunk])
                batch["image"] = batch["image"].to(self.device)
                for index, text in zip(chunk, answer_batch(batch)):
                    answers[index] = text

    def _choices(self, batch: dict[str, Any], method: str) -> list[str]:
        outputs, letters = answer_questions(self.model, batch, method)
        return [letter or output for output, letter in zip(outputs, letters)]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("ademvl answers single-turn questions: multi-round generation (generate_until_multi_"
                                  "round tasks) is not supported")

    # ------------------------------------------------------------------ loglikelihood

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(summed log-probability, greedy) of each request's continuation after its context, scored by the
        project's rank-scoring path: the requests of one question share one pass over its context."""
        args = [request.args for request in requests]
        questions: dict[tuple, list[int]] = {}
        continuations: list[str] = []
        for index, (context, doc_to_target, _, doc_id, task, split) in enumerate(args):
            doc = self._doc(task, split, doc_id)
            continuations.append(doc_to_target if isinstance(doc_to_target, str) else str(doc_to_target(doc)))
            questions.setdefault((task, split, doc_id, context), []).append(index)
        keys = list(questions)
        lengths = [self._length(key[3]) for key in keys]
        results: list[tuple[float, bool] | None] = [None] * len(args)
        for chunk in batches(range(len(keys)), lengths, ["loglikelihood"] * len(keys), self.batch_size):
            chunk_keys = [keys[k] for k in chunk]
            images = [self._image(args[questions[key][0]][2], self._doc(*key[:3])) for key in chunk_keys]
            samples = {**self._visual_batch(images), "text_input": [key[3] for key in chunk_keys]}
            members = [questions[key] for key in chunk_keys]
            scores = self.model.score_candidates(samples, [[continuations[i] for i in row] for row in members], prompt="{}")
            greedy = self._greedy(samples, members, continuations)
            for row, row_scores in zip(members, scores):
                for index, score in zip(row, row_scores):
                    results[index] = (float(score), greedy[index])
        return [result for result in results]  # type: ignore[misc]

    @torch.no_grad()
    def _greedy(self, samples: dict[str, Any], members: list[list[int]], continuations: list[str]) -> dict[int, bool]:
        """Whether greedy decoding after each context gives its continuation's tokens (the closing eos, which the
        score counts, aside)."""
        rows = torch.tensor([row for row, indices in enumerate(members) for _ in indices])
        pairs = {
            "image": samples["image"][rows.to(samples["image"].device)],
            "has_image": samples["has_image"][rows],
            "text_input": [samples["text_input"][row] for row in rows.tolist()],
            "text_output": [continuations[i] for indices in members for i in indices],
        }
        logits, encoded = self.model.answer_logits(pairs, with_answer=True)
        width = logits.shape[1] - 1
        labels = encoded.labels[:, encoded.labels.shape[1] - width :].to(logits.device)
        predicted = logits[:, :-1].argmax(-1)
        flags = {}
        for pair, index in enumerate(i for indices in members for i in indices):
            positions = (labels[pair] != -100).nonzero().flatten()[:-1]  # without the closing eos
            flags[index] = bool((predicted[pair, positions] == labels[pair, positions]).all())
        return flags
