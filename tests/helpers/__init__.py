"""Shared test support, imported as `helpers` (pytest puts tests/ on sys.path; no test imports
conftest or another test module for it).

- `helpers.REPO_ROOT`, `helpers.SHARED_VIDEOS`: the checkout, and the real clips beside it
  (`$VMM_SHARED_VIDEOS`, default ../shared/data/videos; the `shared_videos` fixture skips without).
- `helpers.cli`: the tiny synthetic-set configs and `run_vmm` for end-to-end `vmm` runs.
- `helpers.classifier`: a tiny Conv3d classifier, moving-square clips and a CPU Lightning Trainer.
- `helpers.frames`: frame-folder writers and readers (JPEG/PNG trees, Something-Something layouts).
- `helpers.sifa`: inputs, tolerances and NaN/Inf cases for SIFA's kernel tests.
- `helpers.ddp`: a 2-process gloo fit + test of a datamodule under a recording module.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHARED_VIDEOS = Path(os.environ.get("VMM_SHARED_VIDEOS", REPO_ROOT.parent / "shared" / "data" / "videos"))

__all__ = ["REPO_ROOT", "SHARED_VIDEOS"]
