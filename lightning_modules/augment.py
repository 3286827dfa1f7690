"""Clip augmentation on the device, per clip: one set of parameters for all frames of a clip, a
different set for each clip of the batch.

`VideoClassifier` runs it in `training_step` only, on the uint8 batch after it reached the device
and before normalisation (`ClipAugment`), and mixes clips after normalisation (`mix_clips`).

- Colour jitter, random greyscale and Gaussian blur are kornia's (`kornia.augmentation`), wrapped in
  `VideoSequential(same_on_frame=True)`, which draws each clip's parameters once and applies them
  to all its frames. kornia is the optional extra `augment` (`pip install -e .[augment]`).
- RandAugment is ours: kornia's `RandAugment` draws its operations once per *batch* (every clip
  of a batch gets the same two operations) and its operation list and ranges differ from the
  released SIFA recipe's. `clip_rand_augment` reproduces the released clip RandAugment: `n`
  operations drawn *with replacement* from 16 (below), each always applied, magnitude
  `v = m / 30 · max` on the released per-operation ranges, a random sign per operation where the
  operation has one. So `m` is on a 0–30 scale and the SIFA SSv1 recipe's `m = 27` means 90 % of
  each operation's maximum: rotate ±27°, shear ±0.27, translate ±40.2 % of the side, colour /
  contrast / brightness / sharpness enhance factor 1 ± 0.81, solarize threshold 25.6, solarize-add
  +99 below 128, posterize to 4 − int(3.6) = 1 bit, cutout square of 32.1 % of the width.
  Operations whose released form computes statistics per image (autocontrast, equalize, the
  contrast mean) use the statistics of the whole clip here, so the clip gets one mapping.
- Mixup / CutMix (`mix_clips`) are ours (a clip's CutMix box spans all its frames; targets become
  class probabilities, which `F.cross_entropy` accepts with every head).

Randomness: RandAugment and mixup/CutMix draw on the CPU from torch's default generator, the kornia
operations on the module's device (their generators follow `.to()`; always in float32), so a seeded
run draws the same parameters on any device for ours, per device for kornia's (`VideoClassifier`
seeds and restores the CPU generator and the clips' CUDA generator per batch and rank).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["ClipAugment", "clip_rand_augment", "mix_clips", "RAND_AUGMENT_OPS"]

# The released clip RandAugment's operations and their maximum magnitude (reached at m = 30).
RAND_AUGMENT_OPS: tuple[tuple[str, float], ...] = (
    ("auto_contrast", 1.0),
    ("equalize", 1.0),
    ("invert", 1.0),
    ("rotate", 30.0),  # degrees, random sign
    ("posterize", 4.0),  # bits removed: keeps 4 - int(v) bits
    ("solarize", 256.0),  # threshold 256 - v
    ("solarize_add", 110.0),  # added to pixels below 128
    ("color", 0.9),  # enhance factor 1 +- v
    ("contrast", 0.9),
    ("brightness", 0.9),
    ("sharpness", 0.9),
    ("shear_x", 0.3),  # random sign
    ("shear_y", 0.3),
    ("cutout", 0.3571),  # square side as a fraction of the width
    ("translate_x", 0.4464),  # fraction of the width, random sign
    ("translate_y", 0.4464),
)
_CUTOUT_FILL = (125.0, 123.0, 114.0)
# ITU-R 601-2 luma, as PIL's convert("L").
_LUMA = (0.299, 0.587, 0.114)


def _check_clips(video: Tensor, name: str = "video") -> None:
    if not isinstance(video, Tensor) or video.dtype != torch.uint8 or video.dim() != 5 or video.shape[1] != 3:
        raise ValueError(
            f"{name} must be a uint8 tensor [N,3,T,H,W], got {getattr(video, 'dtype', type(video))} "
            f"of shape {tuple(getattr(video, 'shape', ()))}"
        )


def _per_clip(v: Tensor, x: Tensor) -> Tensor:
    """[B] values -> [B,1,1,1,1] on x's device and dtype, to broadcast over a clip."""
    return v.to(x.device, x.dtype).view(-1, 1, 1, 1, 1)


def _luma(x: Tensor) -> Tensor:
    """[B,3,T,H,W] RGB (0..255) -> [B,1,T,H,W] greyscale, rounded like PIL's L."""
    w = x.new_tensor(_LUMA).view(1, 3, 1, 1, 1)
    return (x * w).sum(1, keepdim=True).round_()


def _blend(degenerate: Tensor, x: Tensor, factor: Tensor) -> Tensor:
    """PIL ImageEnhance: degenerate + factor (x - degenerate), per clip factor [B]."""
    return degenerate + _per_clip(factor, x) * (x - degenerate)


def _affine_nearest(x: Tensor, matrix: Tensor) -> Tensor:
    """Resample clips [B,3,T,H,W] with per-clip affine maps [B,2,3] (nearest, fill 0).

    `matrix` maps an output pixel position (x, y) (pixel centres at +0.5) to the input position it
    reads, as PIL's `Image.transform(AFFINE)`; every frame of a clip uses its clip's map.
    """
    b, c, t, h, w = x.shape
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5, indexing="ij"
    )
    pts = torch.stack([xs, ys, torch.ones_like(xs)], -1).view(1, h * w, 3)  # [1, HW, 3]
    src = pts @ matrix.transpose(1, 2)  # [B, HW, 2] input pixel positions
    grid = torch.stack([src[..., 0] * (2.0 / w) - 1.0, src[..., 1] * (2.0 / h) - 1.0], -1).view(b, 1, h, w, 2)
    grid = grid.to(x.device).expand(b, t, h, w, 2).reshape(b * t, h, w, 2)
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    out = F.grid_sample(frames, grid.to(frames.dtype), mode="nearest", padding_mode="zeros", align_corners=False)
    return out.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def _affine_matrices(a: Tensor, b: Tensor, c: Tensor, d: Tensor, e: Tensor, f: Tensor) -> Tensor:
    return torch.stack([torch.stack([a, b, c], -1), torch.stack([d, e, f], -1)], 1)


def _equalize(x: Tensor) -> Tensor:
    """PIL's ImageOps.equalize with one histogram per clip and channel over all frames."""
    b, c = x.shape[:2]
    flat = x.reshape(b * c, -1).long()
    hist = torch.zeros(b * c, 256, device=x.device, dtype=torch.long).scatter_add_(1, flat, torch.ones_like(flat))
    # PIL: step = (count - count of the last used value) // 255; LUT[i] = (step // 2 + sum(h[:i])) // step.
    last = 255 - torch.flip(hist > 0, [1]).long().argmax(1)
    last_count = hist.gather(1, last.unsqueeze(1)).squeeze(1)
    step = (flat.shape[1] - last_count) // 255
    before = torch.cumsum(hist, 1) - hist
    lut = ((step.unsqueeze(1) // 2 + before) // step.clamp_min(1).unsqueeze(1)).clamp_(0, 255)
    identity = torch.arange(256, device=x.device).expand_as(lut)
    lut = torch.where((step > 0).unsqueeze(1), lut, identity)
    return lut.gather(1, flat).view_as(x).to(x.dtype)


def _sharpness_degenerate(x: Tensor) -> Tensor:
    """PIL's SMOOTH filter (3x3, centre 5, sum 13) per frame; border pixels keep their values."""
    b, c, t, h, w = x.shape
    if h < 3 or w < 3:
        return x
    k = x.new_ones(3, 3)
    k[1, 1] = 5.0
    k = (k / 13.0).view(1, 1, 3, 3).expand(c, 1, 3, 3)
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    smooth = F.conv2d(frames, k, groups=c).round_()
    out = frames.clone()
    out[:, :, 1:-1, 1:-1] = smooth
    return out.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


def _apply_op(name: str, x: Tensor, v: float, sign: Tensor, centre: Tensor) -> Tensor:
    """One RandAugment operation on clips x [B,3,T,H,W] (float, 0..255) at magnitude v.

    `sign` [B] is +-1 per clip, `centre` [B,2] uniform in [0,1) (cutout's centre, x then y).
    """
    b, _, _, h, w = x.shape
    if name == "auto_contrast":
        lo = x.amin((2, 3, 4), keepdim=True)
        hi = x.amax((2, 3, 4), keepdim=True)
        scale = 255.0 / (hi - lo).clamp_min(1.0)
        return torch.where(hi > lo, ((x - lo) * scale).floor_(), x)
    if name == "equalize":
        return _equalize(x)
    if name == "invert":
        return 255.0 - x
    if name == "posterize":
        keep = 4 - int(v)
        step = 2.0 ** (8 - keep)
        return torch.div(x, step, rounding_mode="floor") * step
    if name == "solarize":
        return torch.where(x >= 256.0 - v, 255.0 - x, x)
    if name == "solarize_add":
        return torch.where(x < 128.0, (x + v).clamp_(max=255.0).floor_(), x)
    if name in ("color", "contrast", "brightness", "sharpness"):
        factor = 1.0 + sign * v
        if name == "color":
            degenerate = _luma(x)
        elif name == "contrast":
            degenerate = _luma(x).mean((1, 2, 3, 4), keepdim=True).add_(0.5).floor_()
        elif name == "brightness":
            degenerate = torch.zeros_like(x)
        else:
            degenerate = _sharpness_degenerate(x)
        # PIL clips and truncates the blend to uint8.
        return _blend(degenerate, x, factor).clamp_(0.0, 255.0).floor_()
    if name == "cutout":
        size = v * w
        x0 = (centre[:, 0] * w - size / 2).clamp_min(0).floor()
        y0 = (centre[:, 1] * h - size / 2).clamp_min(0).floor()
        x1 = (x0 + size).clamp(max=w)
        y1 = (y0 + size).clamp(max=h)
        cols = torch.arange(w, dtype=torch.float32)
        rows = torch.arange(h, dtype=torch.float32)
        in_x = (cols >= x0[:, None]) & (cols <= x1[:, None])  # PIL's rectangle includes both corners
        in_y = (rows >= y0[:, None]) & (rows <= y1[:, None])
        box = (in_y[:, :, None] & in_x[:, None, :]).view(b, 1, 1, h, w).to(x.device)
        fill = x.new_tensor(_CUTOUT_FILL).view(1, 3, 1, 1, 1)
        return torch.where(box, fill, x)
    # Geometric operations, as PIL's affine data (a, b, c, d, e, f): input = (a x + b y + c, d x + e y + f).
    one, zero = torch.ones(b), torch.zeros(b)
    s = sign.float() * v
    if name == "shear_x":
        m = _affine_matrices(one, s, zero, zero, one, zero)
    elif name == "shear_y":
        m = _affine_matrices(one, zero, zero, s, one, zero)
    elif name == "translate_x":
        m = _affine_matrices(one, zero, s * w, zero, one, zero)
    elif name == "translate_y":
        m = _affine_matrices(one, zero, zero, zero, one, s * h)
    elif name == "rotate":
        rad = -s * (math.pi / 180.0)  # counter-clockwise for s > 0, as PIL's rotate(s)
        cos, sin = torch.cos(rad), torch.sin(rad)
        cx, cy = w / 2.0, h / 2.0  # about the image centre, corners cut, outside filled with 0
        m = _affine_matrices(cos, sin, cx - cos * cx - sin * cy, -sin, cos, cy + sin * cx - cos * cy)
    else:
        raise ValueError(f"unknown RandAugment operation {name!r}")
    return _affine_nearest(x, m)


def clip_rand_augment(video: Tensor, n: int, m: float) -> Tensor:
    """RandAugment per clip, as the released SIFA clip RandAugment (see the module docstring).

    Args:
        video: uint8 clips [N, 3, T, H, W] (RGB, 0..255), any device.
        n: operations per clip, drawn with replacement from the 16 of `RAND_AUGMENT_OPS`.
        m: magnitude on the released 0..30 scale: each operation runs at `m / 30` of its maximum.

    Returns:
        uint8 clips of the same shape and device; each operation's output is rounded to uint8
        values, as the released PIL operations are.
    """
    _check_clips(video)
    if n < 0 or not 0 <= m <= 30:
        raise ValueError(f"rand_augment: expected n >= 0 and 0 <= m <= 30, got n={n}, m={m}")
    num = video.shape[0]
    if num == 0 or n == 0:
        return video
    # All draws first, in a fixed order, so they do not depend on which operations were picked.
    ops = torch.randint(0, len(RAND_AUGMENT_OPS), (n, num))
    signs = torch.where(torch.rand(n, num) < 0.5, -1.0, 1.0)
    centres = torch.rand(n, num, 2)
    x = video.float()
    for r in range(n):
        for k, (name, max_v) in enumerate(RAND_AUGMENT_OPS):
            idx = (ops[r] == k).nonzero().view(-1)
            if idx.numel() == 0:
                continue
            dev_idx = idx.to(x.device)
            out = _apply_op(name, x.index_select(0, dev_idx), m / 30.0 * max_v, signs[r, idx], centres[r, idx])
            x = x.index_copy(0, dev_idx, out.round_().clamp_(0, 255))
    return x.to(torch.uint8)


class ClipAugment(nn.Module):
    """Per-clip training augmentation of uint8 clips [N, 3, T, H, W] -> uint8, same shape.

    Args:
        color_jitter: (brightness, contrast, saturation, hue) jitter strengths as torchvision's
            ColorJitter (factors drawn in [1-b, 1+b], ..., hue shift in [-h, h] turns), or None.
            The released SIFA Kinetics recipe: (0.4, 0.4, 0.4, 0.1).
        color_jitter_p: probability that a clip is colour-jittered (released: 0.8).
        grayscale_p: probability that a clip is turned grey (released: 0.2).
        blur_p: probability of a Gaussian blur with sigma in `blur_sigma` (released: 0.5, (0.1, 2.0)
            pixels, drawn per clip).
        rand_augment: (n, m) of `clip_rand_augment` (released SIFA SSv1: (2, 27)), or None.

    RandAugment runs first, then colour jitter, greyscale and blur (in that order, as released).
    """

    def __init__(
        self,
        color_jitter: Sequence[float] | None = None,
        color_jitter_p: float = 0.8,
        grayscale_p: float = 0.0,
        blur_p: float = 0.0,
        blur_sigma: tuple[float, float] = (0.1, 2.0),
        rand_augment: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        for name, p in (("color_jitter_p", color_jitter_p), ("grayscale_p", grayscale_p), ("blur_p", blur_p)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {p}")
        if color_jitter is not None and (len(color_jitter) != 4 or min(color_jitter) < 0 or color_jitter[3] > 0.5):
            raise ValueError(
                "color_jitter: expected (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, "
                f"got {color_jitter}"
            )
        if rand_augment is not None:
            if len(rand_augment) != 2:
                raise ValueError(f"rand_augment: expected (n, m), got {rand_augment}")
            n, m = rand_augment
            if int(n) != n or n < 1 or not 0 <= m <= 30:
                raise ValueError(f"rand_augment: expected an integer n >= 1 and 0 <= m <= 30, got {rand_augment}")
        if not 0 < blur_sigma[0] <= blur_sigma[1]:
            raise ValueError(f"blur_sigma: expected 0 < min <= max, got {blur_sigma}")
        self.rand_augment = (int(rand_augment[0]), float(rand_augment[1])) if rand_augment is not None else None
        self.photometric: nn.Module | None = None
        augs = []
        if color_jitter is not None or grayscale_p > 0 or blur_p > 0:
            try:
                import kornia.augmentation as K
            except ImportError as exc:  # the optional extra
                raise ImportError(
                    "color_jitter / grayscale_p / blur_p need kornia: pip install 'video-motion-modules[augment]'"
                ) from exc
            if color_jitter is not None and color_jitter_p > 0:
                augs.append(K.ColorJitter(*map(float, color_jitter), p=color_jitter_p))
            if grayscale_p > 0:
                augs.append(K.RandomGrayscale(p=grayscale_p))
            if blur_p > 0:
                # Kernel wide enough for 3 sigma at the largest sigma.
                size = 2 * math.ceil(3 * blur_sigma[1]) + 1
                augs.append(K.RandomGaussianBlur((size, size), tuple(map(float, blur_sigma)), p=blur_p))
            if augs:
                self.photometric = K.VideoSequential(*augs, data_format="BCTHW", same_on_frame=True)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> ClipAugment:
        # kornia moves its generators with the module, device and dtype; keep its draws in float32 when
        # Lightning casts the module ("bf16-true" would draw the jitter factors in bf16).
        out = super()._apply(fn, *args, **kwargs)
        for module in self.photometric.modules() if self.photometric is not None else ():
            if callable(getattr(module, "set_rng_device_and_dtype", None)):
                module.set_rng_device_and_dtype(module.device, torch.float32)
        return out

    @property
    def enabled(self) -> bool:
        return self.rand_augment is not None or self.photometric is not None

    def forward(self, video: Tensor) -> Tensor:
        """uint8 [N, 3, T, H, W] -> uint8 [N, 3, T, H, W] on the same device; float32 arithmetic even
        inside autocast (bf16-mixed training), so the pixels do not depend on the precision."""
        _check_clips(video)
        with torch.autocast(video.device.type, enabled=False):
            if self.rand_augment is not None:
                video = clip_rand_augment(video, *self.rand_augment)
            if self.photometric is not None and video.shape[0] > 0:
                x = self.photometric(video.float().div_(255.0))
                video = x.mul_(255.0).round_().clamp_(0, 255).to(torch.uint8)
        return video


def mix_clips(
    x: Tensor,
    target: Tensor,
    num_classes: int,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    prob: float = 1.0,
    switch_prob: float = 0.5,
) -> tuple[Tensor, Tensor]:
    """Mixup / CutMix between the clips of a batch, one draw per clip.

    Clip i is mixed with clip perm[i] (a random permutation of the batch) with probability `prob`:
    by mixup (x_i <- lam x_i + (1 - lam) x_perm[i], lam ~ Beta(mixup_alpha, mixup_alpha)) or by CutMix
    (a box of area (1 - lam) of the frame, lam ~ Beta(cutmix_alpha, cutmix_alpha), taken from
    clip perm[i] in every frame; lam is then the exact kept area); with both alphas > 0, CutMix
    with probability `switch_prob`.

    Args:
        x: float clips [N, 3, T, H, W] (normalised: mixing commutes with the per-channel affine
            normalisation, so this equals mixing the pixels).
        target: int64 class ids [N].

    Returns:
        (mixed clips, same shape and dtype; class probabilities [N, num_classes] float32 =
        lam one_hot(y_i) + (1 - lam) one_hot(y_perm[i])).
    """
    if x.dim() != 5 or not x.is_floating_point():
        raise ValueError(f"x: expected float clips [N,3,T,H,W], got {x.dtype} {tuple(x.shape)}")
    if target.shape != (x.shape[0],):
        raise ValueError(f"target: expected class ids of shape ({x.shape[0]},), got {tuple(target.shape)}")
    if mixup_alpha < 0 or cutmix_alpha < 0 or not 0 <= prob <= 1 or not 0 <= switch_prob <= 1:
        raise ValueError(
            f"mixup_alpha, cutmix_alpha: expected >= 0; prob, switch_prob in [0, 1]; got {mixup_alpha}, "
            f"{cutmix_alpha}, {prob}, {switch_prob}"
        )
    n, _, _, h, w = x.shape
    onehot = F.one_hot(target, num_classes).float()
    if n == 0 or (mixup_alpha == 0 and cutmix_alpha == 0) or prob == 0:
        return x, onehot
    # CPU draws in a fixed order (device independent).
    perm = torch.randperm(n)
    apply = torch.rand(n) < prob
    if cutmix_alpha == 0:
        use_cut = torch.zeros(n, dtype=torch.bool)
    else:
        use_cut = torch.rand(n) < (switch_prob if mixup_alpha > 0 else 1.0)
    lam_mix = torch.distributions.Beta(mixup_alpha, mixup_alpha).sample((n,)) if mixup_alpha > 0 else torch.ones(n)
    lam_cut = torch.distributions.Beta(cutmix_alpha, cutmix_alpha).sample((n,)) if cutmix_alpha > 0 else torch.ones(n)
    centre = torch.rand(n, 2)
    # CutMix box: sides sqrt(1 - lam) of the frame's, centre uniform, clipped at the border.
    ratio = (1.0 - lam_cut).sqrt()
    bh, bw = (ratio * h).floor(), (ratio * w).floor()
    cy, cx = (centre[:, 0] * h).floor(), (centre[:, 1] * w).floor()
    y0, y1 = (cy - bh / 2).floor().clamp(0, h), (cy + bh / 2).floor().clamp(0, h)
    x0, x1 = (cx - bw / 2).floor().clamp(0, w), (cx + bw / 2).floor().clamp(0, w)
    rows, cols = torch.arange(h).float(), torch.arange(w).float()
    in_rows = (rows >= y0[:, None]) & (rows < y1[:, None])
    in_cols = (cols >= x0[:, None]) & (cols < x1[:, None])
    box = in_rows[:, :, None] & in_cols[:, None, :]  # [N, H, W]
    box &= (apply & use_cut).view(n, 1, 1)
    lam_cut_exact = 1.0 - box.flatten(1).float().mean(1)
    lam = torch.where(apply & use_cut, lam_cut_exact, torch.where(apply, lam_mix, torch.ones(n)))

    dev_perm = perm.to(x.device)
    partner = x.index_select(0, dev_perm)
    mix_w = torch.where(apply & ~use_cut, lam_mix, torch.ones(n)).to(x.device, x.dtype).view(n, 1, 1, 1, 1)
    out = x * mix_w + partner * (1 - mix_w)
    out = torch.where(box.to(x.device).view(n, 1, 1, h, w), partner, out)
    lam_t = lam.to(onehot.device).view(n, 1)
    soft = lam_t * onehot + (1 - lam_t) * onehot[perm.to(onehot.device)]
    return out, soft
