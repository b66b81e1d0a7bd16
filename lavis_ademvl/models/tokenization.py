"""Tokenizer loading, including a file-free byte-level tokenizer for randomly initialised test models.

The model writes `<bos>? image-prefix [slot] prompt cue answer <eos>` (processing.py) and reads three special tokens:
BOS, prepended when it is not None; eos, which ends every answer; pad, the (masked) filler of left padding and of the
image slots. `load_tokenizer` makes them follow the LLM's own conventions, and never adds a token: a new id would lie
outside the frozen LLM's embedding.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase, PreTrainedTokenizerFast
from transformers.utils import cached_file

BYTE_LEVEL = "byte_level"
# The files a tokenizer is read from: the fast tokenizer's own, or those it is converted from (SentencePiece, BPE, WordPiece).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "spiece.model", "vocab.json", "vocab.txt")


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """One token per UTF-8 byte plus <pad>, <s>, </s> (ids 256-258): needs no file and no download."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    for special in ("<pad>", "<s>", "</s>"):
        vocab[special] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """`byte_level`, a hub name or a local folder; must be a fast tokenizer (offsets keep answers aligned)."""
    if name_or_path == BYTE_LEVEL:
        return byte_level_tokenizer()
    folder = Path(os.path.expanduser(name_or_path))
    if folder.is_dir() and not any((folder / name).is_file() for name in TOKENIZER_FILES):
        # transformers would try a converter and fail with "requires the protobuf library", which would not help
        raise FileNotFoundError(f"tokenizer folder {folder} (model.tokenizer, else model.llm_model) holds none of the "
                                f"tokenizer files {list(TOKENIZER_FILES)}; set model.tokenizer to a folder or hub name "
                                "that has them")
    tokenizer = AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    if tokenizer.is_fast:
        keep_saved_pipeline(tokenizer, str(folder))
    if not tokenizer.is_fast:
        raise ValueError(
            f"tokenizer {name_or_path!r} has no fast (Rust) version; ADEM-VL needs character offsets to "
            "separate prompt, answer cue and answer tokens"
        )
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {name_or_path!r} defines no eos token")
    if tokenizer.pad_token_id is None:
        # LLaMA-3 and Mistral define none. Padding and slot fillers are masked out of attention and loss, so any id of
        # the vocabulary serves; eos exists in every tokenizer that gets here.
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.bos_token_id is not None and tokenizer("").input_ids[:1] != [tokenizer.bos_token_id]:
        # Sequences start with BOS only where the LLM's own tokenizer starts them with it (LLaMA, Mistral and Gemma
        # do); some name a BOS that they never add (SmolLM2's <|im_start|>); Qwen names none.
        tokenizer.bos_token = None
    return tokenizer


def keep_saved_pipeline(tokenizer: PreTrainedTokenizerFast, name_or_path: str) -> None:
    """Put back the normalizer and pre-tokenizer of the checkpoint's tokenizer.json where the tokenizer class replaced
    them with its own. transformers 5 rebuilds LLaMA's from the class (a Metaspace that adds no dummy prefix before a
    leading space), so a text starting with a space would no longer tokenize as the LLM's SentencePiece model did;
    transformers 4.x reads the file as it is (then nothing changes)."""
    path = cached_file(name_or_path, "tokenizer.json", _raise_exceptions_for_missing_entries=False)
    if path is None:
        return
    from tokenizers import Tokenizer

    backend = tokenizer.backend_tokenizer
    with open(path, encoding="utf-8") as file:
        saved = json.load(file)
    loaded = json.loads(backend.to_str())
    if all(saved.get(part) == loaded.get(part) for part in ("normalizer", "pre_tokenizer")):
        return
    original = Tokenizer.from_file(path)
    backend.normalizer, backend.pre_tokenizer = original.normalizer, original.pre_tokenizer
