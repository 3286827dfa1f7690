"""Inflating a torchvision-layout 2D ResNet state dict (ImageNet weights) into the video networks.

Key mapping (target key of the video network ← key of the 2D state dict):

- identical names for the stem (`conv1`, `bn1`), the stages (`layerX.Y.convZ`, `bnZ`,
  `downsample.0/1`) and `fc`;
- `layer4_dual.*` ← `layer4.*` and `fc_dual.*` ← `fc.*` (SIFA-Net's dual path starts as layer4);
- a factorised (2+1)D conv `layerX.Y.convZ.spatial.weight` ← `layerX.Y.convZ.weight` when the
  shapes agree (they do not under Tran et al.'s mid-channel rule, so it is reported as mismatched);
  its `.bn` and `.temporal` have no 2D counterpart.

Tensor rule: a 2D kernel `[O, I, kh, kw]` goes into a 3D kernel `[O, I, kt, kh, kw]` at temporal index
`kt // 2`, zeros elsewhere. That is index 2 of 4 for SIFA-Net's stem (docs/sifa.md §3), the centre for
odd kernels, so the inflated network computes the 2D network frame by frame at init (for the
(2+1)D bottleneck's temporal conv1 too). Every other tensor is copied when the shapes are equal.
Target tensors without a source (motion modules, global-context branches, temporal convs) keep
their init; `fc`/`fc_dual` are skipped when the class count differs. Nothing is ever downloaded.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .checkpoint_file import load_checkpoint_file

log = logging.getLogger(__name__)


@dataclass
class InflationReport:
    """What `inflate_2d_state_dict` did, key by key (target keys unless stated)."""

    loaded: list[str] = field(default_factory=list)
    """Target keys filled from the 2D state dict (copied or inflated)."""
    kept_init: list[str] = field(default_factory=list)
    """Target keys with no 2D counterpart (motion modules, global context, temporal convs)."""
    mismatched: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = field(default_factory=list)
    """(target key, 2D shape, target shape) that could not be inflated; kept at init."""
    skipped_head: list[str] = field(default_factory=list)
    """Head keys (fc, fc_dual) skipped because the number of classes differs."""
    unexpected: list[str] = field(default_factory=list)
    """Keys of the 2D state dict that no target key used."""

    def summary(self) -> str:
        lines = [
            f"loaded {len(self.loaded)} tensors, kept {len(self.kept_init)} at init, "
            f"{len(self.mismatched)} shape mismatches, {len(self.skipped_head)} head tensors skipped, "
            f"{len(self.unexpected)} unexpected 2D keys"
        ]
        if self.mismatched:
            lines.append("mismatched: " + ", ".join(f"{k} {list(s)}->{list(d)}" for k, s, d in self.mismatched))
        if self.skipped_head:
            lines.append("skipped (class count differs): " + ", ".join(self.skipped_head))
        if self.unexpected:
            lines.append("unexpected: " + ", ".join(self.unexpected))
        return "\n".join(lines)


def _source_key(target_key: str) -> str:
    key = re.sub(r"^layer4_dual\.", "layer4.", target_key)
    key = re.sub(r"^fc_dual\.", "fc.", key)
    return re.sub(r"\.(conv\d)\.spatial\.", r".\1.", key)


def inflate_tensor(src: Tensor, dst_shape: torch.Size) -> Tensor | None:
    """`src` reshaped into `dst_shape`: copied when equal, 2D kernel placed at temporal index kt // 2 of a
    zero 3D kernel when `src` is `[O,I,kh,kw]` and `dst_shape` is `[O,I,kt,kh,kw]`; None otherwise."""
    if src.shape == dst_shape:
        return src
    if src.ndim == 4 and len(dst_shape) == 5 and src.shape[:2] == dst_shape[:2] and src.shape[2:] == dst_shape[3:]:
        out = src.new_zeros(dst_shape)
        out[:, :, dst_shape[2] // 2] = src
        return out
    return None


def inflate_2d_state_dict(net: nn.Module, state_dict_2d: dict[str, Tensor]) -> InflationReport:
    """Fill `net`'s parameters and buffers from a 2D ResNet state dict in place; see the module docstring.

    Raises ValueError when not a single backbone tensor matches (wrong depth or `width_mult` != 1).
    """
    if not isinstance(state_dict_2d, dict) or not all(isinstance(v, Tensor) for v in state_dict_2d.values()):
        raise TypeError("state_dict_2d: expected a dict of str -> Tensor (a torchvision ResNet state dict)")
    report = InflationReport()
    used: set[str] = set()
    target = net.state_dict()
    with torch.no_grad():
        for key, dst in target.items():
            src_key = _source_key(key)
            if src_key not in state_dict_2d:
                report.kept_init.append(key)
                continue
            used.add(src_key)
            src = state_dict_2d[src_key]
            value = inflate_tensor(src, dst.shape)
            if value is not None:
                dst.copy_(value)
                report.loaded.append(key)
            elif src_key.startswith("fc."):
                report.skipped_head.append(key)
            else:
                report.mismatched.append((key, tuple(src.shape), tuple(dst.shape)))
    report.unexpected = sorted(set(state_dict_2d) - used)
    # BN's scalar num_batches_tracked always "matches"; it does not show that the weights fit.
    if not any(not k.startswith(("fc.", "fc_dual.")) and not k.endswith("num_batches_tracked") for k in report.loaded):
        raise ValueError(
            "state_dict_2d: no backbone tensor matches the network (is it a torchvision 2D ResNet of the same "
            f"depth, and width_mult 1?)\n{report.summary()}"
        )
    return report


def check_pretrained_path(pretrained: object) -> None:
    """Fail before building a network when `pretrained` is not None and not an existing local file."""
    if pretrained is None:
        return
    if not isinstance(pretrained, (str, os.PathLike)):
        raise TypeError(f"pretrained: expected a path (str) or None, got {type(pretrained).__name__}")
    if not os.path.isfile(pretrained):
        raise ValueError(
            f"pretrained: expected the path of a local 2D ResNet state dict file, got {str(pretrained)!r} "
            "(no such file; weights are never downloaded)"
        )


def load_pretrained_2d(net: nn.Module, path: str | os.PathLike) -> InflationReport:
    """Load a local torchvision-layout 2D ResNet checkpoint (`torch.save(model.state_dict())`, optionally
    wrapped as {"state_dict": ...}) and inflate it into `net`. Logs the report (a warning when some
    tensors were mismatched or unused). The file is loaded with weights_only=True: garbage or a pickle
    that needs any Python object raises `CheckpointError` ("not a 2D ResNet state dict file ...")."""
    check_pretrained_path(path)
    state = load_checkpoint_file(path, "cpu", what="2D ResNet state dict file (pretrained)")
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    report = inflate_2d_state_dict(net, state)
    message = f"pretrained 2D weights from {path} into {type(net).__name__}: {report.summary()}"
    if report.mismatched or report.unexpected:
        log.warning(message)
    else:
        log.info(message)
    return report
