"""COCO caption metrics computed offline with pycocoevalcap's scorers.

pycocoevalcap's COCOEvalCap always runs SPICE, which downloads Stanford CoreNLP, and its tokenizer and METEOR
need Java. Here BLEU-1..4, ROUGE-L and CIDEr always run; METEOR runs when Java is installed; SPICE only when
asked for. Without Java, captions are tokenized in Python the way the PTB tokenizer does for plain captions
(lower case, punctuation split off and removed), and the result says so.
"""
from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Iterable

from lavis_ademvl.common.validation import check_choice

CAPTION_METRICS = ("bleu", "rouge", "cider", "meteor", "spice")
DEFAULT_CAPTION_METRICS = ("bleu", "rouge", "cider", "meteor")
# The tokens pycocoevalcap's PTBTokenizer drops after tokenizing.
_PUNCTUATION = {"''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-", ".", "?", "!", ",", ":", "-", "--", "...", ";"}


def java_available() -> bool:
    return shutil.which("java") is not None


def simple_ptb_tokenize(caption: str) -> str:
    """Lower-case, split punctuation off words, drop the punctuation PTB tokenization drops."""
    caption = caption.lower().replace("\n", " ")
    caption = re.sub(r"(\.\.\.|--|[.,!?;:()\[\]{}\"`])", r" \1 ", caption)
    caption = re.sub(r"(\w)('s|'re|'ve|'ll|'d|n't|'m)\b", r"\1 \2", caption)
    return " ".join(token for token in caption.split() if token not in _PUNCTUATION and token not in "()[]{}\"")


def tokenize(captions: dict[int, list[str]], use_java: bool) -> dict[int, list[str]]:
    if use_java:
        from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

        return PTBTokenizer().tokenize({key: [{"caption": c} for c in values] for key, values in captions.items()})
    return {key: [simple_ptb_tokenize(c) for c in values] for key, values in captions.items()}


def score_captions(
    ground_truth: dict[int, list[str]],
    predictions: dict[int, str],
    metrics: Iterable[str] = DEFAULT_CAPTION_METRICS,
) -> dict[str, float | str]:
    """Corpus-level caption metrics of `predictions` (image id -> caption) against `ground_truth`.

    Only predicted images are scored, so a subset of a split can be evaluated. Keys follow COCOEvalCap:
    Bleu_1..Bleu_4, ROUGE_L, CIDEr, METEOR, SPICE; "tokenizer" says which tokenization was used.
    """
    metrics = list(metrics)
    for metric in metrics:
        check_choice("run.caption_metrics entry", metric, CAPTION_METRICS)
    missing = sorted(set(predictions) - set(ground_truth))
    if missing:
        raise KeyError(f"{len(missing)} predicted image ids have no ground-truth caption, e.g. {missing[:5]}")
    if not predictions:
        raise ValueError("no caption to score")
    use_java = java_available()
    if not use_java and ("meteor" in metrics or "spice" in metrics):
        logging.warning("Java not found: METEOR and SPICE are skipped; captions are tokenized in Python")
        metrics = [m for m in metrics if m not in ("meteor", "spice")]
    ids = sorted(predictions)
    gts = tokenize({i: list(ground_truth[i]) for i in ids}, use_java)
    res = tokenize({i: [predictions[i]] for i in ids}, use_java)

    scores: dict[str, float | str] = {"tokenizer": "ptb" if use_java else "python"}
    for metric in metrics:
        scorer = _scorer(metric)
        score, _ = scorer.compute_score(gts, res)
        if metric == "bleu":
            scores.update({f"Bleu_{n + 1}": float(value) for n, value in enumerate(score)})
        else:
            scores[{"rouge": "ROUGE_L", "cider": "CIDEr", "meteor": "METEOR", "spice": "SPICE"}[metric]] = float(score)
    return scores


def _scorer(metric: str):
    if metric == "bleu":
        from pycocoevalcap.bleu.bleu import Bleu

        return Bleu(4)
    if metric == "rouge":
        from pycocoevalcap.rouge.rouge import Rouge

        return Rouge()
    if metric == "cider":
        from pycocoevalcap.cider.cider import Cider

        return Cider()
    if metric == "meteor":
        from pycocoevalcap.meteor.meteor import Meteor

        return Meteor()
    from pycocoevalcap.spice.spice import Spice

    return Spice()
