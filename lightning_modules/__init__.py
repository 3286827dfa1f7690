"""LightningModule, CLI and networks of vmm.

`VideoClassifier` is the one LightningModule; the networks live in `lightning_modules.networks`; the
console script `vmm` is `lightning_modules.cli:main`. `VideoClassifier` and `EvalResult` are imported
on first use, so `vmm --help` starts without torch and Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .classifier import EvalResult, VideoClassifier

__all__ = ["EvalResult", "VideoClassifier"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(f"{__name__}.classifier"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
