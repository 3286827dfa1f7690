"""Safe loads of checkpoints and weight files, for the networks (pretrained weights) and the module side.

Checkpoints and weight files are user input, and unpickling runs code. They are read with
`torch.load(weights_only=True)`, which only rebuilds tensors and plain containers; anything else is
refused with one `CheckpointError` ("not a <what>: <path>: <why>"). A leaf: it imports only torch, so
the networks load their pretrained weights without importing anything of the LightningModule side
(`lightning_modules.io` re-exports it for the CLI and the checkpoint IO).
"""

from __future__ import annotations

import contextlib
import os
import re
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["SAFE_GLOBALS", "CheckpointError", "load_checkpoint_file"]

# Globals a vmm checkpoint may hold beyond tensors and plain containers. Checkpoints written by
# `vmm fit` need none: hyperparameters are stored as plain data (classifier.py, on_save_checkpoint).
SAFE_GLOBALS: list[Any] = []


class CheckpointError(ValueError):
    """A file given as a checkpoint or weight file that cannot be loaded safely."""


def _why_refused(exc: BaseException) -> str:
    """A one-line reason from torch.load's error, without its advice to load unsafely.

    torch words a refused pickle in several ways (an unknown global, a blocked module such as
    os/posix, an unsupported opcode), each wrapped in "Weights only load failed" and advice to
    retry with weights_only=False; only the refused object or opcode is kept."""
    text = str(exc)
    unsafe = re.search(r"GLOBAL ([\w.]+) (?:was not an allowed global|whose module [\w.]+ is blocked)", text)
    if unsafe:
        return (
            f"it holds objects that a safe load refuses (the Python object {unsafe.group(1)}, which a vmm "
            "checkpoint never needs); nothing in it was run"
        )
    refused = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(?:\n\s*\n|Check the documentation|$)", text, re.S)
    if refused and refused.group(1).startswith("Unsupported operand"):  # a pickle opcode torch never writes
        return (
            f"not a torch.save file, or a pickle that a safe load refuses ({refused.group(1).strip()[:80]}); "
            "nothing in it was run"
        )
    if refused or "Weights only load failed" in text:
        detail = " ".join(refused.group(1).split())[:200] if refused else ""
        return f"it holds objects that a safe load refuses{f' ({detail})' if detail else ''}; nothing in it was run"
    detail = " ".join(text.split())[:200]
    return f"truncated or not a torch.save file ({type(exc).__name__}: {detail})"


def load_checkpoint_file(
    path: str | os.PathLike,
    map_location: Any = "cpu",
    *,
    what: str = "vmm checkpoint",
    require: Callable[[Any], str | None] | None = None,
) -> Any:
    """`torch.load(path, weights_only=True)` with one clear error for anything that is not `what`.

    Args:
        path: a local file.
        map_location: as for torch.load.
        what: the kind of file expected, used in the error ("not a <what>: <path>: <why>").
        require: optional check of the loaded object; returns a reason string to refuse it.

    Raises:
        CheckpointError: missing file, garbage, a truncated file, a pickle that needs any Python
            object beyond tensors and containers (never executed), or `require` refused it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"not a {what}: {path}: {'not a regular file' if path.exists() else 'no such file'}")
    try:
        # safe_globals needs torch >= 2.5; with nothing to allow, the plain weights-only load is the same.
        allow = torch.serialization.safe_globals(SAFE_GLOBALS) if SAFE_GLOBALS else contextlib.nullcontext()
        with allow, warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pickle protocol.*")  # refused or fine either way
            obj = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises UnpicklingError, RuntimeError, EOFError, ... for bad files
        raise CheckpointError(f"not a {what}: {path}: {_why_refused(exc)}") from None
    reason = require(obj) if require is not None else None
    if reason:
        raise CheckpointError(f"not a {what}: {path}: {reason}")
    return obj
