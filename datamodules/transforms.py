"""Spatial transforms of uint8 clips. Scaling to a short side happens in the decoder (swscale); the
rest works on uint8 tensors, and nothing here normalises (the LightningModule does, on the device).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

TrainCrop = Literal["random", "random_resized"]

__all__ = ["ClipTransform", "TrainCrop", "three_crop_offsets"]


def three_crop_offsets(size: int, crop: int) -> list[int]:
    """Offsets of the first/centre/last crop of length `crop` along an axis of length `size`."""
    return [0, (size - crop) // 2, size - crop]


def _resize_uint8(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (antialiased when shrinking) resize of uint8 [T,H,W,3] to [T,size[0],size[1],3]."""
    y = x.permute(0, 3, 1, 2).float()
    y = F.interpolate(y, size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)


@dataclass(frozen=True)
class ClipTransform:
    """Training or evaluation transform of a decoded clip.

    Training: the decoder scales the short side to a random value in `short_side` (min, max)
    (scale jitter), then a random `crop_size` crop (or a random resized crop: area fraction in
    `area_range`, aspect ratio in `ratio_range`, resized to `crop_size`), then a horizontal flip with
    probability 0.5 when `flip`. Evaluation: the decoder scales to `short_side[0]`, then
    `num_crops` crops of `crop_size`: 1 = centre, 3 = left/centre/right (top/centre/bottom for
    portrait frames). `crop_size=None` keeps the whole frame.
    """

    train: bool
    short_side: tuple[int, int]
    crop_size: int | None
    crop: TrainCrop = "random"
    flip: bool = False
    num_crops: int = 1
    area_range: tuple[float, float] = (0.25, 1.0)
    ratio_range: tuple[float, float] = (3 / 4, 4 / 3)

    def __post_init__(self):
        lo, hi = self.short_side
        if not (0 < lo <= hi):
            raise ValueError(f"short_side: expected 0 < min <= max, got {self.short_side}")
        if self.crop_size is not None and self.crop_size < 1:
            raise ValueError(f"crop_size: expected a positive int or None, got {self.crop_size}")
        if self.crop not in ("random", "random_resized"):
            raise ValueError(f"crop: expected 'random' or 'random_resized', got {self.crop!r}")
        if self.num_crops not in (1, 3):
            raise ValueError(f"num_crops (test_crops): expected 1 or 3, got {self.num_crops}")

    def decode_short_side(self, rng: np.random.Generator) -> int:
        """The short side the decoder scales to (random in training, never below the crop)."""
        lo, hi = self.short_side
        side = int(rng.integers(lo, hi + 1)) if self.train and hi > lo else lo
        return max(side, self.crop_size or 0)

    def __call__(self, frames: np.ndarray | torch.Tensor, rng: np.random.Generator) -> list[torch.Tensor]:
        """uint8 [T,H,W,3] -> list of `num_crops` (training: 1) uint8 [3,T,h,w] views."""
        x = torch.as_tensor(frames)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"frames: expected uint8 [T,H,W,3], got {x.dtype} {tuple(x.shape)}")
        views = self._train(x, rng) if self.train else self._eval(x)
        return [v.permute(3, 0, 1, 2).contiguous() for v in views]

    def _train(self, x: torch.Tensor, rng: np.random.Generator) -> list[torch.Tensor]:
        h, w = x.shape[1:3]
        c = self.crop_size
        if c is not None:
            if self.crop == "random_resized":
                y0, x0, ch, cw = self._rrc_box(h, w, rng)
                x = _resize_uint8(x[:, y0 : y0 + ch, x0 : x0 + cw], (c, c))
            else:
                if h < c or w < c:
                    x = _resize_uint8(x, (max(h, c), max(w, c)))
                    h, w = x.shape[1:3]
                y0 = int(rng.integers(0, h - c + 1))
                x0 = int(rng.integers(0, w - c + 1))
                x = x[:, y0 : y0 + c, x0 : x0 + c]
        if self.flip and rng.random() < 0.5:
            x = x.flip(2)
        return [x]

    def _rrc_box(self, h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        area = h * w
        log_r = (math.log(self.ratio_range[0]), math.log(self.ratio_range[1]))
        for _ in range(10):
            target = area * rng.uniform(*self.area_range)
            ratio = math.exp(rng.uniform(*log_r))
            cw = round(math.sqrt(target * ratio))
            ch = round(math.sqrt(target / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
        s = min(h, w)  # fall back to the central square
        return (h - s) // 2, (w - s) // 2, s, s

    def _eval(self, x: torch.Tensor) -> list[torch.Tensor]:
        c = self.crop_size
        if c is None:
            return [x] * self.num_crops
        h, w = x.shape[1:3]
        if h < c or w < c:
            x = _resize_uint8(x, (max(h, c), max(w, c)))
            h, w = x.shape[1:3]
        cy, cx = (h - c) // 2, (w - c) // 2
        if self.num_crops == 1:
            return [x[:, cy : cy + c, cx : cx + c]]
        if w >= h:
            return [x[:, cy : cy + c, o : o + c] for o in three_crop_offsets(w, c)]
        return [x[:, o : o + c, cx : cx + c] for o in three_crop_offsets(h, c)]
