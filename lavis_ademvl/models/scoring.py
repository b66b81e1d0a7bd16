"""Rank inference: candidate answers scored by their log-likelihood after each sample's prompt (never fails to answer).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from lavis_ademvl.models.processing import answer_after, image_flags

if TYPE_CHECKING:
    from lavis_ademvl.models.ademvl import AdemVL


@torch.no_grad()
def score_candidates(
    model: AdemVL, samples: dict, answer_list: Sequence[Sequence[str]], prompt: str | None = None, rows_per_pass: int = 64
) -> list[list[float]]:
    """Sum of log-probabilities of each candidate's tokens (and the closing eos) after the sample's prompt.

    The vision tower runs once per sample; the (sample, candidate) pairs go through the LLM `rows_per_pass` at a time.
    """
    pairs = [(row, candidate) for row, candidates in enumerate(answer_list) for candidate in candidates]
    if not pairs:
        raise ValueError("answer_list holds no candidate")
    prompts, cues, _ = model.sample_texts(samples, with_answer=False, prompt=prompt)
    has_image = image_flags(samples, len(prompts))
    with model.autocast():
        visual = model.visual_inputs(samples.get("image"), has_image.to(model.device))
    flat_scores: list[float] = []
    for start in range(0, len(pairs), rows_per_pass):
        chunk = pairs[start : start + rows_per_pass]
        rows = torch.tensor([row for row, _ in chunk])
        expanded = {
            "has_image": has_image[rows],
            "text_input": [prompts[row] for row, _ in chunk],
            "answer_cue": [cues[row] for row, _ in chunk],
            "text_output": [candidate for _, candidate in chunk],
        }
        device_rows = rows.to(model.device)
        chunk_visual = tuple(None if t is None else t[device_rows] for t in visual)
        logits, encoded = model.answer_logits(expanded, with_answer=True, visual=chunk_visual)
        logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        targets = encoded.labels[:, encoded.labels.shape[1] + 1 - logits.shape[1] :]
        token_logprobs = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        flat_scores += (token_logprobs * (targets != -100)).sum(-1).tolist()
    scores, start = [], 0
    for candidates in answer_list:
        scores.append(flat_scores[start : start + len(candidates)])
        start += len(candidates)
    return scores


def preselect(model: AdemVL, samples: dict, answers: Sequence[str], count: int, prompt: str | None) -> list[list[str]]:
    """The `count` answers per sample whose first token is most likely after the prompt (one LLM pass)."""
    tokenizer = model.tokenizer
    first_tokens = [
        ids[0] if ids else tokenizer.eos_token_id
        for ids in tokenizer([" " + a.strip() for a in answers], add_special_tokens=False).input_ids
    ]
    logits, _ = model.answer_logits(samples, with_answer=False, prompt=prompt)
    logprobs = torch.log_softmax(logits[:, -1].float(), dim=-1)[:, first_tokens]
    top = logprobs.topk(min(count, len(answers)), dim=-1).indices.tolist()
    return [[answers[i] for i in row] for row in top]


@torch.no_grad()
def rank(
    model: AdemVL,
    samples: dict,
    answer_list: Sequence[str] | Sequence[Sequence[str]],
    num_ans_candidates: int,
    prompt: str | None,
) -> list[str]:
    """The most likely candidate of each sample. `answer_list` is either one list for all samples (VQA: the
    num_ans_candidates answers with the likeliest first token are scored in full, a space put before each) or one
    list per sample, scored in full as given."""
    if not answer_list:
        raise ValueError("inference_method='rank' needs answer_list (candidate answers)")
    if all(isinstance(answer, str) for answer in answer_list):
        shortlists = preselect(model, samples, answer_list, num_ans_candidates, prompt)
        prompts, cues, _ = model.sample_texts(samples, with_answer=False, prompt=prompt)
        candidates = [[answer_after(p + c, a) for a in row] for p, c, row in zip(prompts, cues, shortlists)]
        scores = score_candidates(model, samples, candidates, prompt)
    else:
        shortlists = [list(candidates) for candidates in answer_list]
        scores = score_candidates(model, samples, shortlists, prompt)
    return [candidates[max(range(len(row)), key=row.__getitem__)] for candidates, row in zip(shortlists, scores)]
