"""Hugging Face folders that read the same under transformers 4.55 and 5.x, and refusing one that would not.

transformers 5 writes a decoder's rope settings only as `rope_parameters` (4.x ignores the key and falls back to
rope_theta 10000, silently changing every position encoding) and names a generic fast tokenizer `TokenizersBackend`
(a class 4.x does not have). `make_portable` adds what 4.x reads to a folder this project wrote; `check_rope_read`
refuses a folder whose rope settings the installed transformers would not read.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PretrainedConfig

# 5.x's name for the generic fast tokenizer, and the name both versions load it by.
_GENERIC_TOKENIZER = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def rope_settings(config: dict[str, Any] | PretrainedConfig) -> dict[str, Any]:
    """The rope settings a decoder runs with (`rope_theta`, `rope_type`, scaling keys; {} without rope): of a
    config.json's dict, 5.x's `rope_parameters` where present, else 4.x's `rope_theta` / `rope_scaling`; of a loaded
    config, what its transformers reads (4.x: the attributes `rope_theta` / `rope_scaling`, 5.x: `rope_parameters`)."""
    if isinstance(config, dict):
        parameters = config.get("rope_parameters")
        if isinstance(parameters, dict) and "rope_theta" in parameters:
            settings = dict(parameters)
        else:
            settings = {**(config.get("rope_scaling") or {}),
                        **({"rope_theta": config["rope_theta"]} if "rope_theta" in config else {})}
    elif hasattr(config, "rope_theta"):  # transformers 4.x: a `rope_parameters` key is kept but never read
        settings = {**(getattr(config, "rope_scaling", None) or {}), "rope_theta": config.rope_theta}
    else:
        settings = dict(getattr(config, "rope_parameters", None) or {})
    if settings:
        settings.setdefault("rope_type", settings.get("type", "default"))
    return settings


def make_portable(folder: str | os.PathLike) -> None:
    """Rewrite a saved folder's config.json and tokenizer_config.json so that transformers 4.x reads them as 5.x does:
    `rope_theta` (and `rope_scaling` for a scaled rope) beside `rope_parameters`, and a tokenizer class 4.x knows.
    A folder written by 4.x is left as it is."""
    folder = Path(folder)
    config_path = folder / "config.json"
    if config_path.is_file():
        config = json.loads(config_path.read_text())
        parameters = config.get("rope_parameters")
        if isinstance(parameters, dict) and "rope_theta" in parameters:
            config["rope_theta"] = parameters["rope_theta"]
            if parameters.get("rope_type", "default") != "default":
                config["rope_scaling"] = {key: value for key, value in parameters.items() if key != "rope_theta"}
            config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    tokenizer_path = folder / "tokenizer_config.json"
    if tokenizer_path.is_file():
        tokenizer = json.loads(tokenizer_path.read_text())
        if tokenizer.get("tokenizer_class") in _GENERIC_TOKENIZER:
            tokenizer["tokenizer_class"] = _GENERIC_TOKENIZER[tokenizer["tokenizer_class"]]
            tokenizer_path.write_text(json.dumps(tokenizer, indent=2, sort_keys=True) + "\n")


def check_rope_read(config_json: dict[str, Any], loaded: PretrainedConfig, source: str) -> None:
    """A ValueError naming `source` and the key when the loaded config's rope settings are not the config.json's:
    a folder written by transformers 5 (only `rope_parameters`) read by 4.x, which ignores that key."""
    written, read = rope_settings(config_json), rope_settings(loaded)
    if not written:  # no rope key written (LLaMA-1's config.json): the defaults are what every version runs
        return
    differing = sorted(key for key in ("rope_theta", "rope_type", "factor") if read.get(key) != written.get(key))
    if differing:
        raise ValueError(
            f"{source}: config.json's rope_parameters {json.dumps(config_json.get('rope_parameters'))} are not read by "
            f"this transformers (it would use {', '.join(f'{key}={read.get(key)!r}' for key in differing)}): the folder "
            "was written by transformers 5; install the default stack (make install), or add rope_theta (and "
            "rope_scaling) beside rope_parameters in its config.json")
