"""Rank inference: candidate answers scored by their log-likelihood after each sample's prompt (never fails to answer).

`RankScoringMixin` gives the model its scoring methods, as Hugging Face's `GenerationMixin` gives a model `generate`;
it reads the model only through its public face (`sample_texts`, `processor`, `sample_visual_inputs`, `llm_inputs`,
`llm`, `logits_to_keep`, `answer_logits`, `tokenizer`, `device`, `llm_spans_devices`).
"""
from __future__ import annotations

import inspect
import math
from collections.abc import Sequence

import torch

from lavis_ademvl.models.processing import EncodedBatch, VisualInputs, answer_after, image_flags
from lavis_ademvl.models.sharding import keep_in_step


class RankScoringMixin:
    """Scoring of candidate answers (`score_candidates`) and rank inference (`rank_answers`)."""

    @torch.no_grad()
    def score_candidates(
        self, samples: dict, answer_list: Sequence[Sequence[str]], prompt: str | None = None, rows_per_pass: int = 64
    ) -> list[list[float]]:
        """Sum of log-probabilities of each candidate's tokens (and the closing eos) after the sample's prompt.

        The vision tower runs once per sample; the (sample, candidate) pairs go through the LLM `rows_per_pass` at a
        time, and the tokens a sample's candidates share (its prompt) once per sample (`shared_prefix_scores`).
        """
        pairs = [(row, candidate) for row, candidates in enumerate(answer_list) for candidate in candidates]
        if not pairs:
            raise ValueError("answer_list holds no candidate")
        prompts, cues, _ = self.sample_texts(samples, with_answer=False, prompt=prompt)
        has_image = image_flags(samples, len(prompts))
        visual = self.sample_visual_inputs(samples, len(prompts))
        flat_scores: list[float] = []
        chunks = math.ceil(len(pairs) / rows_per_pass)
        for _ in range(chunks, keep_in_step(self, chunks)):  # two passes per chunk: its prefix, its pairs' suffixes
            self.idle_llm_pass()
            self.idle_llm_pass()
        for start in range(0, len(pairs), rows_per_pass):
            chunk = pairs[start : start + rows_per_pass]
            rows = torch.tensor([row for row, _ in chunk])
            expanded = {
                "has_image": has_image[rows],
                "text_input": [prompts[row] for row, _ in chunk],
                "answer_cue": [cues[row] for row, _ in chunk],
                "text_output": [candidate for _, candidate in chunk],
            }
            flat_scores += shared_prefix_scores(self, expanded, rows, visual)
        scores, start = [], 0
        for candidates in answer_list:
            scores.append(flat_scores[start : start + len(candidates)])
            start += len(candidates)
        return scores

    @torch.no_grad()
    def rank_answers(
        self,
        samples: dict,
        answer_list: Sequence[str] | Sequence[Sequence[str]],
        num_ans_candidates: int,
        prompt: str | None = None,
    ) -> list[str]:
        """The most likely candidate of each sample. `answer_list` is either one list for all samples (VQA: the
        num_ans_candidates answers with the likeliest first token are scored in full, a space put before each) or one
        list per sample, scored in full as given."""
        if not answer_list:
            raise ValueError("inference_method='rank' needs answer_list (candidate answers)")
        if all(isinstance(answer, str) for answer in answer_list):
            shortlists = preselect(self, samples, answer_list, num_ans_candidates, prompt)
            prompts, cues, _ = self.sample_texts(samples, with_answer=False, prompt=prompt)
            candidates = [[answer_after(p + c, a) for a in row] for p, c, row in zip(prompts, cues, shortlists)]
            scores = self.score_candidates(samples, candidates, prompt)
        else:
            shortlists = [list(candidates) for candidates in answer_list]
            scores = self.score_candidates(samples, shortlists, prompt)
        return [candidates[max(range(len(row)), key=row.__getitem__)] for candidates, row in zip(shortlists, scores)]



def kv_cache_argument(llm: torch.nn.Module) -> str:
    """What the LLM's forward calls its key/value cache, in and out: `cache` in transformers 5 (where
    `past_key_values` is deprecated, to be removed in 5.40), `past_key_values` in 4.x."""
    return "cache" if "cache" in inspect.signature(llm.forward).parameters else "past_key_values"


def shared_prefix_scores(model: RankScoringMixin, pair_samples: dict, rows: torch.Tensor, visual: VisualInputs) -> list[float]:
    """Scores of (sample, candidate) pairs, sample `rows[i]` for pair i: each sample's tokens common to all its pairs
    (up to its first answer token) run once, with the KV cache, and the rest of each pair after it.

    Exactly the full-sequence scores (tests/test_model.py restates them): the pairs are tokenized as training does,
    and the shared part is found on the token ids, so tokenizer merges and truncation change nothing.
    """
    encoded = model.processor.encode(pair_samples, with_answer=True)  # on the host: its ids are read as lists
    pads = (encoded.attention_mask == 0).sum(-1).tolist()
    sequences = [ids[pad:] for ids, pad in zip(encoded.input_ids.tolist(), pads)]
    labels = [row_labels[pad:] for row_labels, pad in zip(encoded.labels.tolist(), pads)]
    slots = [row_slots[pad:] for row_slots, pad in zip(encoded.slot_mask.tolist(), pads)]
    scored = [i for i, row_labels in enumerate(labels) if any(label != -100 for label in row_labels)]
    scores = [0.0] * len(sequences)  # a pair whose answer truncation cut away (truncation 'end') scores 0
    if not scored:
        if model.llm_sharded:  # the passes every other rank makes for its chunk
            model.idle_llm_pass()
            model.idle_llm_pass()
        return scores
    # One prefix per sample: the ids all its pairs share, ending at or before its first answer token. The image
    # slots precede the prompt, so they are always in it: the suffixes need no slot embeddings.
    sample_of = rows.tolist()
    members: dict[int, list[int]] = {}
    for i in scored:
        members.setdefault(sample_of[i], []).append(i)
    groups = sorted(members)
    shared: dict[int, int] = {}
    for row in groups:
        first, *others = members[row]
        length = min(next(t for t, label in enumerate(labels[i]) if label != -100) for i in members[row])
        for i in others:
            length = min(length, common_length(sequences[first], sequences[i]))
        if length < 1:
            raise ValueError("rank scoring needs at least one token (bos, image prompt or prompt) before the answers")
        shared[row] = length
    device = model.device
    # Index tensors handed to the LLM and its cache live where the tensors they index do: the LLM's device, or the CPU
    # when the LLM spans devices (a CPU index indexes a tensor on any device).
    index_device = None if model.llm_spans_devices else device

    prefix = left_padded([sequences[members[row][0]][: shared[row]] for row in groups], model.tokenizer.pad_token_id)
    prefix_slots = left_padded([slots[members[row][0]][: shared[row]] for row in groups], False)
    prefix_batch = EncodedBatch(prefix[0], prefix[1], prefix_slots[0].bool(), torch.full_like(prefix[0], -100)).to(device)
    group_visual = tuple(None if t is None else t[torch.tensor(groups, device=device)] for t in visual)
    with model.llm_inputs(prefix_batch, group_visual) as embeds:
        output = model.llm(
            inputs_embeds=embeds, attention_mask=prefix_batch.attention_mask, position_ids=prefix_batch.position_ids,
            use_cache=True, **model.logits_to_keep(embeds, 1),
        )
    cache_key = kv_cache_argument(model.llm)
    prefix_logits, cache = output.logits[:, -1], getattr(output, cache_key)

    starts = [shared[sample_of[i]] for i in scored]
    suffix_ids = [sequences[i][start:] for i, start in zip(scored, starts)]
    suffix_labels = [labels[i][start:] for i, start in zip(scored, starts)]
    width = max(len(ids) for ids in suffix_ids)
    pad_id = model.tokenizer.pad_token_id
    input_ids = torch.tensor([ids + [pad_id] * (width - len(ids)) for ids in suffix_ids])
    targets = torch.tensor([row_labels + [-100] * (width - len(row_labels)) for row_labels in suffix_labels])
    group_index = {row: index for index, row in enumerate(groups)}
    group_of = torch.tensor([group_index[sample_of[i]] for i in scored])
    # Each pair continues its sample's cached prefix: the prefix's padding stays masked, the suffix is right-padded
    # (causal attention: the padding after a pair's last token never reaches it).
    attention_mask = torch.cat([prefix[1][group_of], torch.ones_like(input_ids)], dim=1)
    position_ids = torch.tensor([[start + t for t in range(width)] for start in starts])
    suffix_batch = EncodedBatch(input_ids, attention_mask, torch.zeros_like(input_ids, dtype=torch.bool), targets).to(device)
    cache.batch_select_indices(group_of.to(index_device))
    pair_rows = rows[scored].to(device)
    pair_visual = (*(None if t is None else t[pair_rows] for t in visual[:2]), None)
    with model.llm_inputs(suffix_batch, pair_visual) as embeds:
        output = model.llm(
            inputs_embeds=embeds, attention_mask=suffix_batch.attention_mask,
            position_ids=position_ids.to(device), use_cache=True, **{cache_key: cache},
        )
    # The logit for suffix token t comes from the token before it: the prefix's last one for t = 0.
    logits = torch.cat([prefix_logits[group_of.to(index_device)].unsqueeze(1), output.logits[:, :-1]], dim=1)
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    targets = suffix_batch.labels.to(logprobs.device, non_blocking=True)
    token_logprobs = logprobs.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    for i, score in zip(scored, (token_logprobs * (targets != -100)).sum(-1).tolist()):
        scores[i] = score
    return scores


def common_length(first: Sequence[int], second: Sequence[int]) -> int:
    """Length of the longest common start of two id lists."""
    for index, (a, b) in enumerate(zip(first, second)):
        if a != b:
            return index
    return min(len(first), len(second))


def left_padded(sequences: Sequence[Sequence[int | bool]], pad: int | bool) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, L] values, [N, L] attention mask) of lists left-padded to the longest."""
    width = max(len(sequence) for sequence in sequences)
    values = torch.tensor([[pad] * (width - len(sequence)) + list(sequence) for sequence in sequences])
    mask = torch.tensor([[0] * (width - len(sequence)) + [1] * len(sequence) for sequence in sequences])
    return values, mask


def preselect(model: RankScoringMixin, samples: dict, answers: Sequence[str], count: int, prompt: str | None) -> list[list[str]]:
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
