"""Both notebooks execute top to bottom (tiny settings: VMM_NOTEBOOK_FAST=1) in a real Jupyter kernel."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
import pytest
from helpers import REPO_ROOT, SHARED_VIDEOS
from nbclient import NotebookClient

NOTEBOOKS = REPO_ROOT / "notebooks"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["quickstart.ipynb", "look_inside.ipynb"])
def test_notebook_executes(name, tmp_path_factory, tmp_path, monkeypatch):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    # Same cache root as the CLI tests: the tiny dataset is generated once per session.
    monkeypatch.setenv("VMM_CACHE", str(tmp_path_factory.getbasetemp() / "vmm_synthetic"))
    monkeypatch.setenv("VMM_NOTEBOOK_FAST", "1")
    monkeypatch.setenv("VMM_NOTEBOOK_OUT", str(tmp_path))
    monkeypatch.setenv("VMM_SHARED_VIDEOS", str(SHARED_VIDEOS))
    monkeypatch.delenv("MPLBACKEND", raising=False)  # the kernel's inline backend embeds the figures
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "2"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 3, f"{name}: expected figures, got {len(images)}"
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    if name == "quickstart.ipynb":
        assert "test top-1" in text and "true:" in text
    else:
        assert "SIFA blocks:" in text and "offsets: mean" in text
        if SHARED_VIDEOS.is_dir():
            assert "skipping the real clip" not in text
    assert not any(Path(NOTEBOOKS).glob("*.ckpt"))  # outputs go to temporary directories
