"""LightningModule, CLI and networks of vmm.

`VideoClassifier` is the one LightningModule; the networks live in `lightning_modules.networks`
(imported on demand, so `vmm --help` does not build the ops); the console script `vmm` is
`lightning_modules.cli:main`.
"""

from .classifier import EvalResult, VideoClassifier

__all__ = ["EvalResult", "VideoClassifier"]
