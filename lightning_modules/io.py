"""Files the module and the CLI read and write: atomic writes and safe checkpoint loads.

Atomic writes (`datamodules.safe_io`'s writer, the one in the tree, re-exported here): every
report and checkpoint is written to a temporary file in the target's own directory, flushed to
disk, then renamed over the target (`os.replace`, atomic on one file system). A failed write (disk
full, a signal, an error while serialising) removes the temporary file and leaves an older file of
that name untouched; readers never see a truncated file. A symlink is written through (its
resolved target is replaced, the link stays); an existing path that is not a regular file (a
device, a FIFO, a socket) is refused, never replaced by a file.

Safe loads: checkpoints and weight files are user input, and unpickling runs code. They are read
with `torch.load(weights_only=True)`, which only rebuilds tensors and plain containers; anything
else is refused with one `CheckpointError` ("not a vmm checkpoint: <path>: <why>"). The loader,
`load_checkpoint_file`, lives in `lightning_modules.networks.checkpoint_file` (the networks load
their pretrained weights with it) and is re-exported here.
"""

from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.cloud_io import get_filesystem

# The writers and readers live with the data layer, the lowest one both sides import.
from datamodules.safe_io import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    atomic_writer,
    check_readable_file,
    check_writable_file,
    to_json_safe,
    write_target,
)

# Safe loads live with the networks (their pretrained weights use them), the lowest layer of this side.
from .networks.checkpoint_file import CheckpointError, load_checkpoint_file

__all__ = [
    "AtomicCheckpointIO",
    "CheckpointError",
    "ConfigError",
    "atomic_writer",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_readable_file",
    "check_writable_file",
    "check_yaml_expansion",
    "load_checkpoint_file",
    "load_vmm_checkpoint",
    "to_json_safe",
    "write_target",
]


class ConfigError(ValueError):
    """A configuration file or value that vmm refuses to load."""


# A real run configuration holds a few hundred values (a few thousand with inline class names).
MAX_CONFIG_VALUES = 100_000


def check_yaml_expansion(text: str, loader: type | None = None, limit: int = MAX_CONFIG_VALUES) -> None:
    """Refuse YAML whose aliases expand to more than `limit` values ("billion laughs": a few
    hundred bytes of nested anchors that a config parser copying the data expands to 10**9).

    PyYAML itself shares aliased nodes, so the expanded size is counted on the composed node graph
    (each node's size once), never by expanding. Raises ConfigError (recursive aliases, nesting
    too deep for the parser, too many values); YAML syntax errors propagate as yaml.YAMLError.
    """
    import yaml

    loader_obj = (loader or getattr(yaml, "CSafeLoader", yaml.SafeLoader))(text)
    try:
        root = loader_obj.get_single_node()
    except RecursionError:
        raise ConfigError("the YAML is nested too deeply") from None
    finally:
        loader_obj.dispose()
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: Any) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise ConfigError("an alias refers to a node that contains it (recursive YAML)")
        total = 1
        if isinstance(node, yaml.SequenceNode):
            children = node.value
        elif isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        else:
            children = []
        active.add(key)
        for child in children:
            total += size(child)
            if total > limit:
                break
        active.discard(key)
        sizes[key] = total
        return total

    try:
        if root is not None and size(root) > limit:
            raise ConfigError(f"its aliases (*name) expand to more than {limit:,} values; refused unexpanded")
    except RecursionError:
        raise ConfigError("the YAML is nested too deeply") from None


# ------------------------------------------------------------------------------ checkpoints


def _is_lightning_checkpoint(obj: Any) -> str | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("state_dict"), dict):
        return "no state_dict (not a Lightning checkpoint)"
    return None


def load_vmm_checkpoint(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """A Lightning checkpoint (a dict with `state_dict`), loaded safely; see `load_checkpoint_file`."""
    return load_checkpoint_file(path, map_location, require=_is_lightning_checkpoint)


# Lightning >= 2.6 takes weights_only in TorchCheckpointIO.load_checkpoint; 2.5 always loads unrestricted.
_LIGHTNING_LOADS_WEIGHTS_ONLY = "weights_only" in inspect.signature(TorchCheckpointIO.load_checkpoint).parameters


def _load_remote_weights_only(path: str, map_location: Any) -> dict[str, Any]:
    """A checkpoint at an fsspec URL, read as Lightning reads one, with torch.load(weights_only=True)."""
    fs = get_filesystem(path)
    if not fs.exists(path):
        raise FileNotFoundError(f"Checkpoint file not found: {path}")
    with fs.open(path, "rb") as f:
        return torch.load(f, map_location=map_location, weights_only=True)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint IO that writes atomically in the target's directory and loads safely.

    Lightning's own IO serialises into memory, writes to a temporary file in the system temp
    directory and moves it; across file systems that move is a copy, which a full disk truncates.
    Loads always use weights_only=True, whatever the caller asks for (`--ckpt_path` is user input).
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options)  # remote: Lightning's fsspec path
            return
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with atomic_writer(path, "wb") as f:
            torch.save(checkpoint, f)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        # Strategy.load_checkpoint passes no map_location: tensors go to the CPU (Lightning moves the model
        # afterwards), never to the device they were saved from (absent on a CPU machine; cuda:0 on every rank).
        if map_location is None:
            map_location = "cpu"
        if "://" in str(path):
            if _LIGHTNING_LOADS_WEIGHTS_ONLY:
                return super().load_checkpoint(path, map_location=map_location, weights_only=True)
            return _load_remote_weights_only(path, map_location)
        if not Path(path).exists():
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        return load_vmm_checkpoint(path, map_location=map_location)
