"""Careless and hostile input to the `vmm` command line: every expected error is one line naming
the fix (a traceback only under VMM_DEBUG=1 or for real bugs), pickles refused in torch's current
wording, output and input paths checked before any work, oversized or special score files and
alias-bomb configs refused, and checkpoints that outlive their pretrained weight file.
"""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from lightning_modules.io import CheckpointError, load_vmm_checkpoint


class _SystemOnUnpickle:
    """Unpickling this calls os.system: torch blocks the whole `os`/`posix` module by name."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("fmt", ["zip", "legacy"])
def test_blocked_pickle_is_reported_as_refused_objects_without_torch_advice(tmp_path, fmt):
    path = tmp_path / f"evil_{fmt}.ckpt"
    payload = {"state_dict": {}, "hyper_parameters": {"x": _SystemOnUnpickle()}}
    if fmt == "zip":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(CheckpointError) as exc:
        load_vmm_checkpoint(path)
    msg = str(exc.value)
    assert msg.startswith(f"not a vmm checkpoint: {path}: "), msg
    assert "holds objects that a safe load refuses" in msg, msg
    assert "truncated" not in msg and "weights_only" not in msg.replace("weights_only=True", ""), msg
    assert "Re-running" not in msg and "\n" not in msg, msg
    if fmt == "zip":
        assert "posix.system" in msg, msg
