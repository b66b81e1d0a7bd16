"""Generation with Hugging Face `generate`: batch equals single, beams carry the visual memory."""
from __future__ import annotations

import pytest
import torch
from helpers import tiny_model, to_device


@pytest.fixture(scope="module")
def model(device):
    torch.manual_seed(3)
    # Strong fusion so that wrong visual memory per row would change the text.
    model = tiny_model(alpha=5.0, beta=1.0, prompt="a picture of ").eval()
    with torch.no_grad():
        model.visual_value_offset.normal_(0, 0.5)
    return model.to(device)


def samples(has_image, seed=0, questions=None, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    batch = {"image": torch.randn(len(has_image), 3, 32, 32, generator=generator), "has_image": torch.tensor(has_image)}
    if questions is not None:
        batch["text_input"] = questions
    return to_device(batch, device)


def rows(batch, index):
    return {key: value[index : index + 1] for key, value in batch.items()}


QUESTIONS = ["Question: what colour? Short answer:", "Q: shape?", "Question: how many objects are there here?"]


@pytest.mark.parametrize("num_beams", [1, 3])
@pytest.mark.parametrize("has_image", [[1, 1, 1], [0, 0, 0], [1, 0, 1]])
def test_batch_equals_single(model, num_beams, has_image, device):
    batch = samples(has_image, questions=QUESTIONS, device=device)
    together = model.generate(batch, num_beams=num_beams, max_length=8, min_length=1)
    alone = [model.generate(rows(batch, i), num_beams=num_beams, max_length=8, min_length=1)[0] for i in range(3)]
    assert together == alone


def test_visual_memory_changes_generation(model, device):
    batch = samples([1, 1, 1], questions=[QUESTIONS[0]] * 3, device=device)
    batch["image"][1] = batch["image"][0]
    texts = model.generate(batch, num_beams=3, max_length=8)
    assert texts[0] == texts[1]
    others = [model.generate(samples([1], seed=s, questions=[QUESTIONS[0]], device=device), num_beams=3, max_length=8)[0]
              for s in range(5, 12)]
    assert any(text != texts[0] for text in others)
    # Without an image, the placeholder tensor is not seen: any two give the same text.
    blind = [model.generate(samples([0], seed=s, questions=[QUESTIONS[0]], device=device), num_beams=3, max_length=8)[0]
             for s in (5, 6)]
    assert blind[0] == blind[1]


def test_captions_follow_the_model_prompt(model, device):
    batch = samples([1, 1], device=device)
    captions = model.generate(batch, num_beams=3, max_length=6, num_captions=2)
    assert len(captions) == 4
    prompts, _, _ = model.sample_texts(batch, with_answer=False)
    assert prompts == ["a picture of ", "a picture of "]
    with_prompt = model.generate(batch, num_beams=3, max_length=6, prompt="a picture of ")
    assert with_prompt == model.generate(batch, num_beams=3, max_length=6)


def test_nucleus_sampling_returns_num_captions(model, device):
    torch.manual_seed(0)
    captions = model.generate(samples([1, 0], device=device), use_nucleus_sampling=True, num_captions=3, max_length=5)
    assert len(captions) == 6 and all(isinstance(c, str) for c in captions)
    with pytest.raises(ValueError, match="num_captions=4 needs num_beams"):
        model.generate(samples([1], device=device), num_beams=2, num_captions=4)


def test_max_and_min_length_count_new_tokens(model, device):
    batch = samples([1, 0], questions=QUESTIONS[:2], device=device)
    new_tokens = model.generate_token_ids(batch, max_new_tokens=4, min_new_tokens=4, num_beams=1, do_sample=False)
    assert new_tokens.shape == (2, 4)  # only new tokens come back, eos suppressed until min_new_tokens
    assert (new_tokens != model.tokenizer.eos_token_id).all()


def test_vqa_rank_with_a_shared_answer_list(model, device):
    batch = samples([1, 0, 1], questions=QUESTIONS, device=device)
    answers = ["red", "blue", "green", "two", "circle"]
    predictions = model.predict_answers(batch, inference_method="rank", answer_list=answers, num_ans_candidates=3,
                                        prompt="{}")
    assert all(p in answers for p in predictions)
    # With every candidate kept, rank equals the best full-sequence score.
    full = model.predict_answers(batch, inference_method="rank", answer_list=answers, num_ans_candidates=5, prompt="{}")
    scores = model.score_candidates(batch, [[" " + a for a in answers]] * 3, prompt="{}")
    assert full == [answers[max(range(5), key=row.__getitem__)] for row in scores]


def test_training_formats(model, device):
    """LAVIS's caption batches (text_input is the caption) and VQA batches (answer/weight/n_answers)."""
    caption_batch = samples([1, 1], device=device)
    caption_batch["text_input"] = ["a red circle", "two blue squares"]
    prompts, _, answers = model.sample_texts(caption_batch, with_answer=True)
    assert prompts == ["a picture of "] * 2 and answers == ["a red circle", "two blue squares"]
    vqa_batch = samples([1, 1], questions=["what colour?", "what shape?"], device=device)
    vqa_batch.update(to_device(dict(answer=["red", "pink", "circle"], weight=torch.tensor([0.3, 0.7, 1.0]),
                                    n_answers=torch.tensor([2, 1])), device))
    prompts, _, answers = model.sample_texts(vqa_batch, with_answer=True, prompt="Question: {} Short answer:")
    assert prompts == ["Question: what colour? Short answer:", "Question: what shape? Short answer:"]
    assert answers == [" pink", " circle"]  # one space after "answer:"
    assert torch.isfinite(model(caption_batch)["loss"]) and torch.isfinite(model(vqa_batch)["loss"])
    # The caption's first word is a label: the prompt's trailing space moved into the answer.
    encoded = model.encode_batch(caption_batch, with_answer=True)
    labels = encoded.labels[0][encoded.labels[0] != -100].tolist()
    assert model.tokenizer.decode(labels) == " a red circle</s>"
