"""The model's text processor: a batch of samples -> token ids, image-slot positions and answer labels.

Layout of one sequence: <bos>? image-prefix [slot] prompt cue answer <eos>, left-padded so that every sequence's last
token sits in the last column. `truncation` decides what is cut from a sequence longer than `max_len` (see
`AdemVLConfig.truncation`).

A multi-turn sample (`conversation`: its turns, each a (prompt, answer) pair) is a sequence of several such segments
after one image prefix: <bos>? image-prefix [slot] prompt1 answer1 <eos> prompt2 answer2 <eos> ...; each turn is
tokenized as a single-turn sample's text is, and its answer tokens and <eos> carry the labels. Only the first turn is
ever cut (as a single-turn sample is); later turns that do not fit in `max_len` are dropped whole, so the image slot
stays and no turn's labels are split.
"""
from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedTokenizerBase

from lavis_ademvl.models.config import AdemVLConfig

# What a forward pass computes once from the images: (activated keys [B,Nv,d], values [B,Nv,d], slot embeddings
# [B,S,d]), each None where the fusion has none.
VisualInputs = tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]


@dataclass
class EncodedBatch:
    """Token ids of a batch, left-padded, with the image slot positions and answer labels (-100 elsewhere)."""

    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    slot_mask: torch.Tensor  # [B, L] True where visual slot embeddings go
    labels: torch.Tensor  # [B, L]
    # How many of the last columns hold a label in some row (0: none), known on the host so that no step reads it back
    # from the device; left padding puts every label there.
    labelled_columns: int = 0
    padded: bool = True  # whether some row is padded (known on the host)

    @property
    def position_ids(self) -> torch.Tensor:
        return (self.attention_mask.cumsum(-1) - 1).clamp(min=0)

    def to(self, device: torch.device | str) -> EncodedBatch:
        """On `device`, copied without waiting for the device (non-blocking: no host synchronisation)."""
        tensors = (self.input_ids, self.attention_mask, self.slot_mask, self.labels)
        return EncodedBatch(*(tensor.to(device, non_blocking=True) for tensor in tensors), self.labelled_columns,
                            self.padded)


@dataclass(frozen=True)
class Turn:
    """One segment of a sequence: a prompt, the answer cue, and the answer (None when generating)."""

    prompt: str
    cue: str = ""
    answer: str | None = None


class PromptEncoder:
    """Tokenizes, truncates and left-pads the texts of a batch; `slot_length` pad tokens mark where the visual slot
    embeddings go ([cls], prepended visual tokens) in samples that have an image."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, config: AdemVLConfig, slot_length: int) -> None:
        self.tokenizer = tokenizer
        self.max_len = config.max_len
        self.truncation = config.truncation
        self.image_prompt, self.no_image_prompt = config.image_prompt, config.no_image_prompt
        self.prompt = config.prompt
        self.slot_length = slot_length
        self._truncation_warned = False

    def texts(self, samples: dict, with_answer: bool, prompt: str | None = None) -> tuple[list[str], list[str], list[str | None]]:
        """(prompts, answer cues, answers) of a batch in any of the sample formats LAVIS's datasets produce:

        - `text_input` + `text_output` (+ `answer_cue`): prompt and target given (ScienceQA, our VQA);
        - `text_input` + `answer`/`weight`/`n_answers` (LAVIS VQA training): question in `prompt`, best answer;
        - `text_input` alone while training (LAVIS captioning): the caption follows `prompt`;
        - otherwise (inference): `text_input` as a question in `prompt`, or `prompt` alone (captioning).
        """
        template = self.prompt if prompt is None else prompt
        count = batch_size(samples)
        cues = _per_sample(samples.get("answer_cue", ""), count)
        if "text_output" in samples:
            return list(samples["text_input"]), cues, list(samples["text_output"]) if with_answer else [None] * count
        questions = samples.get("text_input")
        if "n_answers" in samples:
            prompts = [fill_prompt(template, q) for q in questions]
            if not with_answer:
                return prompts, cues, [None] * count
            return prompts, cues, [answer_after(p + c, a) for p, c, a in zip(prompts, cues, _best_answers(samples))]
        if with_answer:
            if questions is None:
                raise KeyError("training samples need `text_input` (and `text_output` unless it is a caption)")
            return [template] * count, cues, [answer_after(template + c, caption) for c, caption in zip(cues, questions)]
        prompts = [fill_prompt(template, q) for q in questions] if questions is not None else [template] * count
        return prompts, cues, [None] * count

    def encode(self, samples: dict, with_answer: bool, prompt: str | None = None, reserve: int = 0) -> EncodedBatch:
        """The batch on the CPU; `reserve`: the number of tokens generation will add."""
        conversations = self.turns(samples, with_answer, prompt)
        if not conversations:
            raise ValueError("the batch holds no samples (text_input and image are empty)")
        has_image = image_flags(samples, len(conversations))
        encoded = [self.encode_turns(turns, bool(h), reserve) for turns, h in zip(conversations, has_image.tolist())]
        length = max(len(ids) for ids, _, _ in encoded)
        label_starts = [length - len(ids) + next((i for i, label in enumerate(row_labels) if label != -100), len(ids))
                        for ids, _, row_labels in encoded]
        batch = len(encoded)
        input_ids = torch.full((batch, length), self.tokenizer.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((batch, length), dtype=torch.long)
        slot_mask = torch.zeros((batch, length), dtype=torch.bool)
        labels = torch.full((batch, length), -100, dtype=torch.long)
        for row, (ids, slot_start, row_labels) in enumerate(encoded):
            offset = length - len(ids)
            input_ids[row, offset:] = torch.tensor(ids)
            attention_mask[row, offset:] = 1
            labels[row, offset:] = torch.tensor(row_labels)
            if slot_start >= 0:
                slot_mask[row, offset + slot_start : offset + slot_start + self.slot_length] = True
        padded = any(len(ids) < length for ids, _, _ in encoded)
        return EncodedBatch(input_ids, attention_mask, slot_mask, labels, length - min(label_starts), padded)

    def turns(self, samples: dict, with_answer: bool, prompt: str | None = None) -> list[list[Turn]]:
        """The turns of each sample: a `conversation` field's (training only), else one turn from `texts`."""
        if "conversation" in samples:
            if not with_answer:
                raise ValueError("multi-turn `conversation` samples are for training; generation takes one prompt")
            return [[Turn(turn_prompt, "", answer) for turn_prompt, answer in turns] for turns in samples["conversation"]]
        return [[Turn(p, c, a)] for p, c, a in zip(*self.texts(samples, with_answer, prompt))]

    def encode_turns(self, turns: Sequence[Turn], with_slot: bool, reserve: int = 0) -> tuple[list[int], int, list[int]]:
        """Token ids, the index of the first image-slot token (-1 if none), and labels (-100 = no loss) of one sample:
        its first turn cut as `truncation` says, later turns kept whole or dropped."""
        if not turns:
            raise ValueError("a sample needs at least one turn")
        tok = self.tokenizer
        prefix: list[int] = [tok.bos_token_id] if tok.bos_token_id is not None else []
        slot_start = -1
        if self.slot_length:
            prefix += tok(self.image_prompt if with_slot else self.no_image_prompt, add_special_tokens=False).input_ids
            if with_slot:
                slot_start = len(prefix)
                prefix += [tok.pad_token_id] * self.slot_length
        first, *later = turns
        if self.truncation == "end":
            input_ids, labels = self._encode_whole(prefix, first.prompt + first.cue, first.answer, reserve)
        else:
            input_ids, labels = self._encode_protected(prefix, first.prompt, first.cue, first.answer)
        for index, turn in enumerate(later, start=1):
            if turn.answer is None:
                raise ValueError("only a single-turn sample can end without an answer (the prompt to generate after)")
            turn_ids, turn_labels = self._turn_tokens(turn)
            if len(input_ids) + len(turn_ids) > self.max_len:
                self._warn_truncation(f"by dropping whole turns (from turn {index + 1} of {len(turns)})")
                break
            input_ids, labels = input_ids + turn_ids, labels + turn_labels
        return input_ids, slot_start, labels

    def _turn_tokens(self, turn: Turn) -> tuple[list[int], list[int]]:
        """A later turn's ids and labels, tokenized as the first turn's text is, uncut."""
        if self.truncation == "end":
            return self._whole_tokens(turn.prompt + turn.cue, turn.answer)
        prompt_ids, protected, answer_ids = self._protected_tokens(turn.prompt, turn.cue, turn.answer)
        ids = prompt_ids + protected
        return ids, [-100] * (len(ids) - len(answer_ids)) + answer_ids

    def _warn_truncation(self, where: str) -> None:
        if not self._truncation_warned:
            logging.warning("sequences longer than max_len=%d are cut %s", self.max_len, where)
            self._truncation_warned = True

    def _encode_whole(self, prefix: list[int], context: str, answer: str | None, reserve: int) -> tuple[list[int], list[int]]:
        """truncation `end`, the authors' sequences: context and answer tokenized as ONE string, labels from as many
        tokens as the context has alone; the whole sequence cut at max_len from its end (answer and eos may be lost).
        Generation keeps the start: the prompt is cut so that `reserve` new tokens fit in max_len."""
        tok = self.tokenizer
        if answer is None:
            # Trailing spaces are the answer's first token (a caption prompt "a picture of " is generated from
            # "a picture of", as the authors do).
            ids = prefix + tok(context.rstrip(), add_special_tokens=False).input_ids
            limit = self.max_len - reserve
            if limit <= len(prefix):
                raise ValueError(
                    f"max_len={self.max_len} leaves no room for the prompt when generating {reserve} tokens "
                    f"(truncation='end'); raise model.max_len"
                )
            if len(ids) > limit:
                self._warn_truncation("at their end (truncation='end')")
            return ids[:limit], [-100] * min(len(ids), limit)
        if self.max_len < len(prefix) + 1:
            raise ValueError(f"max_len={self.max_len} cuts into the image prefix ({len(prefix)} tokens)")
        text_ids, text_labels = self._whole_tokens(context, answer)
        ids, labels = prefix + text_ids, [-100] * len(prefix) + text_labels
        if len(ids) > self.max_len:
            self._warn_truncation("at their end (truncation='end'): the answer may be lost")
        return ids[: self.max_len], labels[: self.max_len]

    def _whole_tokens(self, context: str, answer: str) -> tuple[list[int], list[int]]:
        """The authors' tokens: context and answer as ONE string, then eos; labels from as many tokens as the context
        has alone."""
        tok = self.tokenizer
        num_context = len(tok(context, add_special_tokens=False).input_ids)
        ids = tok(context + answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
        return ids, [-100 if index < num_context else token for index, token in enumerate(ids)]

    def _encode_protected(self, prefix: list[int], prompt: str, cue: str, answer: str | None) -> tuple[list[int], list[int]]:
        """truncation `middle` (ours): only the prompt may be cut, in its middle; the cue and answer never are."""
        prompt_ids, protected, answer_ids = self._protected_tokens(prompt, cue, answer)
        budget = self.max_len - len(prefix) - len(protected)
        if budget < 0:
            raise ValueError(
                f"the image prefix, answer cue and answer take {len(prefix) + len(protected)} tokens, more than "
                f"max_len={self.max_len}: {(cue + (answer or ''))[:80]!r}"
            )
        if len(prompt_ids) > budget:
            self._warn_truncation("in their prompt's middle (truncation='middle')")
            head = budget // 2
            prompt_ids = prompt_ids[:head] + prompt_ids[len(prompt_ids) - (budget - head) :]
        input_ids = prefix + prompt_ids + protected
        labels = [-100] * (len(input_ids) - len(answer_ids)) + answer_ids
        return input_ids, labels

    def _protected_tokens(self, prompt: str, cue: str, answer: str | None) -> tuple[list[int], list[int], list[int]]:
        """(prompt ids, the ids after them: cue, answer and eos, the answer's ids and eos); the prompt's own tokens are
        those that end within it."""
        tok = self.tokenizer
        # Trailing spaces belong to the answer's first token ("of" + " a", not "of " + "a"), so training and
        # generation see the same token boundary.
        context = (prompt + cue).rstrip()
        if answer is not None:
            answer = (prompt + cue)[len(context) :] + answer
        prompt, cue = prompt[: len(context)], context[len(prompt) :] if len(context) > len(prompt) else ""
        text = context + (answer or "")
        encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = encoded.input_ids, encoded.offset_mapping
        prompt_end, answer_start = len(prompt), len(prompt) + len(cue)
        num_prompt = sum(1 for _, end in offsets if end <= prompt_end)
        num_answer = sum(1 for start, end in offsets if start >= answer_start and end > start) if answer else 0
        prompt_ids, protected = ids[:num_prompt], ids[num_prompt:]
        answer_ids = protected[len(protected) - num_answer :] if num_answer else []
        if answer is not None:
            answer_ids = answer_ids + [tok.eos_token_id]
            protected = protected + [tok.eos_token_id]
        return prompt_ids, protected, answer_ids


def batch_size(samples: dict) -> int:
    for key in ("image", "text_input", "has_image"):
        if samples.get(key) is not None:
            return len(samples[key])
    raise KeyError("samples hold neither `image` nor `text_input`")


def image_flags(samples: dict, count: int) -> torch.Tensor:
    """[B] 0/1 on the CPU: `has_image`, else 1 for every sample when the batch holds images."""
    has_image = samples.get("has_image")
    if has_image is None:
        return torch.ones(count, dtype=torch.long) if samples.get("image") is not None else torch.zeros(count, dtype=torch.long)
    return torch.as_tensor(has_image).long().cpu()


def fill_prompt(template: str, question: str) -> str:
    """A VQA prompt: `template` with `{}` replaced by the question, or the question appended."""
    return template.format(question) if "{}" in template else template + question


def answer_after(context: str, answer: str) -> str:
    """`answer` separated from `context` by exactly one space (none added when the context ends with one)."""
    answer = answer.strip()
    return answer if context[-1:].isspace() else " " + answer


def _best_answers(samples: dict) -> list[str]:
    """The highest-weighted answer of each question in LAVIS's flattened VQA batch (answer/weight/n_answers)."""
    answers, weights = samples["answer"], torch.as_tensor(samples["weight"]).tolist()
    best, start = [], 0
    for count in torch.as_tensor(samples["n_answers"]).tolist():
        span = range(start, start + count)
        best.append(answers[max(span, key=lambda i: weights[i])])
        start += count
    return best


def _per_sample(value: str | Sequence[str], count: int) -> list[str]:
    return [value] * count if isinstance(value, str) else list(value)


def last_columns(length: int, count: int, device: torch.device | None) -> torch.Tensor:
    """Indices of the last `count` of `length` positions, for Hugging Face's `logits_to_keep`. An index tensor, not an
    int: an int slices a non-contiguous view, and the vocabulary projection of that view copies the [vocab, d] weight
    once per sample."""
    return torch.arange(length - count, length, device=device)
