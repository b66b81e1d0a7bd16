"""Reading checkpoint files: every load path (model.finetuned, model.load_checkpoint, run.resume_ckpt_path, predict,
visualize, compare) goes through `load_checkpoint_file`.

Files are read with `torch.load(weights_only=True)`: tensors and plain Python values only, never arbitrary objects.
The one class added to that allow-list, for this load only, is `argparse.Namespace`: the authors' `save_model` stores
their command-line arguments under "args" (beside "model", "optimizer", "epoch" and "scaler"). A file holding any
other class is refused with an error naming the file and the class.
"""
from __future__ import annotations

import argparse
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

ALLOWED_GLOBALS = (argparse.Namespace,)
ZIP_SIGNATURE = b"PK\x03\x04"  # torch.save's format since torch 1.6
PICKLE_PROTOCOL = b"\x80"  # the first byte of a pickle of protocol 2 or later: torch's legacy format


def _qualified_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _refused_globals(path: str) -> list[str]:
    """The classes and functions the file would need beyond torch's defaults and ALLOWED_GLOBALS ([] if unknown)."""
    allowed = {_qualified_name(cls) for cls in ALLOWED_GLOBALS}
    try:
        found = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except (ValueError, RuntimeError, OSError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile):
        return []
    return [name for name in found if name not in allowed]


def load_checkpoint_file(path: str | Path, what: str = "checkpoint") -> dict[str, Any]:
    """The dict saved in `path` (on the CPU). Missing file: FileNotFoundError; a file that needs a class other than
    argparse.Namespace, or is no torch checkpoint at all: ValueError naming the file (and the class)."""
    path = os.path.expanduser(str(path))
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file not found: {path}")
    with open(path, "rb") as handle:
        start = handle.read(len(ZIP_SIGNATURE))
    # A text file read as torch's legacy pickle fails with a bare KeyError (`error: 101`): refused by its first bytes.
    if start and not start.startswith((ZIP_SIGNATURE, PICKLE_PROTOCOL)):
        raise ValueError(f"{what} {path} is not a readable torch checkpoint: it starts with {start!r}, neither a zip archive "
                         "(torch.save's format) nor a pickle")
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    # KeyError, IndexError: a damaged legacy pickle refers to memo entries that do not exist.
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError) as error:
        refused = _refused_globals(path)
        if refused:
            raise ValueError(
                f"{what} {path} was refused: it holds {refused}, and checkpoints may hold only tensors, plain Python "
                f"values and argparse.Namespace (torch.load with weights_only=True). Load it only if you trust its "
                f"source, and save its tensors without those objects."
            ) from error
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{what} {path} is not a readable torch checkpoint (empty, cut short, or another format): "
                         f"{reason}") from error
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{what} {path} holds a {type(checkpoint).__name__}, not a dict of weights")
    return checkpoint


def non_finite_keys(state: dict[str, Any]) -> list[str]:
    """The names of the floating-point tensors of `state` that hold a NaN or inf."""
    return [name for name, value in state.items()
            if isinstance(value, torch.Tensor) and torch.is_floating_point(value) and not torch.isfinite(value).all()]
