"""Per-clip augmentation on the device (lightning_modules/augment.py) and its use in VideoClassifier.

Reference first: every RandAugment operation is checked, on a one-frame clip, against the PIL
operation the released SIFA clip RandAugment applies, at the recipe's m = 27 on the 0–30 scale.
Then the per-clip contract (one set of parameters for all frames of a clip, different ones across
clips, uint8 in and out, reproducible under a seed), mixup/CutMix targets, and real Trainer runs.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from helpers.classifier import SquareData, TinyNet, lightning_cpu_trainer

from lightning_modules import VideoClassifier
from lightning_modules.augment import RAND_AUGMENT_OPS, ClipAugment, _apply_op, clip_rand_augment, mix_clips

M = 27  # the SIFA SSv1 recipe's magnitude, on the released 0..30 scale


def _image(h: int = 36, w: int = 44):
    """A smooth RGB PIL image (upsampled noise), so geometric ops move visible structure."""
    pil = pytest.importorskip("PIL.Image")
    small = np.random.default_rng(0).integers(0, 256, (9, 11, 3)).astype(np.uint8)
    return pil.fromarray(small).resize((w, h), pil.BILINEAR)


def _ours(img, name: str, sign: float, centre=(0.5, 0.5)) -> np.ndarray:
    x = torch.from_numpy(np.array(img)).permute(2, 0, 1)[None, :, None].float()  # [1,3,1,H,W]
    v = M / 30 * dict(RAND_AUGMENT_OPS)[name]
    out = _apply_op(name, x, v, torch.tensor([sign]), torch.tensor([centre]))
    return out.round().clamp(0, 255)[0, :, 0].permute(1, 2, 0).numpy().astype(np.uint8)


def _released(img, name: str, sign: float, centre=(0.5, 0.5)) -> np.ndarray:
    """The released clip RandAugment's PIL operation on one frame, magnitude M/30 of its maximum."""
    from PIL import Image, ImageDraw, ImageEnhance, ImageOps

    v = M / 30 * dict(RAND_AUGMENT_OPS)[name]
    w, h = img.size
    affine = {
        "shear_x": (1, sign * v, 0, 0, 1, 0),
        "shear_y": (1, 0, 0, sign * v, 1, 0),
        "translate_x": (1, 0, sign * v * w, 0, 1, 0),
        "translate_y": (1, 0, 0, 0, 1, sign * v * h),
    }
    enhance = {
        "color": ImageEnhance.Color,
        "contrast": ImageEnhance.Contrast,
        "brightness": ImageEnhance.Brightness,
        "sharpness": ImageEnhance.Sharpness,
    }
    if name in affine:
        out = img.transform(img.size, Image.AFFINE, affine[name])
    elif name in enhance:
        out = enhance[name](img).enhance(1 + sign * v)
    elif name == "rotate":
        out = img.rotate(sign * v)
    elif name == "auto_contrast":
        out = ImageOps.autocontrast(img)
    elif name == "equalize":
        out = ImageOps.equalize(img)
    elif name == "invert":
        out = ImageOps.invert(img)
    elif name == "posterize":
        out = ImageOps.posterize(img, 4 - int(v))
    elif name == "solarize":
        out = ImageOps.solarize(img, 256 - v)
    elif name == "solarize_add":
        a = np.array(img)
        return np.where(a < 128, np.clip(a.astype(np.int64) + v, 0, 255).astype(np.uint8), a)
    elif name == "cutout":
        size = v * w
        x0, y0 = int(max(0, centre[0] * w - size / 2)), int(max(0, centre[1] * h - size / 2))
        out = img.copy()
        ImageDraw.Draw(out).rectangle((x0, y0, min(w, x0 + size), min(h, y0 + size)), (125, 123, 114))
    else:
        raise AssertionError(name)
    return np.array(out)


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("name", [op for op, _ in RAND_AUGMENT_OPS])
def test_rand_augment_ops_match_released_pil_ops(name, sign):
    img = _image()
    centre = (0.3, 0.7)
    ours, ref = _ours(img, name, sign, centre), _released(img, name, sign, centre)
    assert ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


def test_rand_augment_magnitude_scale():
    # m is on the released 0..30 scale: at m = 27 every operation runs at 0.9 of its maximum.
    v = {name: M / 30 * mx for name, mx in RAND_AUGMENT_OPS}
    assert v["rotate"] == pytest.approx(27.0)
    assert v["shear_x"] == pytest.approx(0.27)
    assert v["translate_x"] == pytest.approx(0.40176)
    assert v["brightness"] == pytest.approx(0.81)
    assert 4 - int(v["posterize"]) == 1  # one bit kept
    assert 256 - v["solarize"] == pytest.approx(25.6)
    with pytest.raises(ValueError, match="rand_augment"):
        ClipAugment(rand_augment=(2, 31))
    with pytest.raises(ValueError, match="rand_augment"):
        ClipAugment(rand_augment=(0, 10))


def _static_clips(n: int = 12, t: int = 4, h: int = 24, w: int = 28) -> torch.Tensor:
    """n identical clips whose frames are all the same image."""
    g = torch.Generator().manual_seed(1)
    frame = torch.randint(0, 256, (1, 3, 1, h, w), generator=g, dtype=torch.uint8)
    return frame.expand(n, 3, t, h, w).contiguous()


def _augmenters() -> dict[str, ClipAugment]:
    out = {"rand_augment": ClipAugment(rand_augment=(2, M))}
    try:
        import kornia  # noqa: F401
    except ImportError:
        return out
    out["color"] = ClipAugment(color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=1.0, grayscale_p=0.2, blur_p=0.5)
    out["all"] = ClipAugment(color_jitter=(0.4, 0.4, 0.4, 0.1), grayscale_p=0.2, blur_p=0.5, rand_augment=(2, M))
    return out


@pytest.mark.parametrize("which", ["rand_augment", "color", "all"])
def test_clip_augment_is_per_clip_uint8_and_seeded(which):
    aug = _augmenters().get(which)
    if aug is None:
        pytest.skip("kornia (the 'augment' extra) is not installed")
    video = _static_clips()
    torch.manual_seed(3)
    out = aug(video)
    assert out.dtype == torch.uint8 and out.shape == video.shape
    # The same parameters for every frame of a clip: a static clip stays static.
    for f in range(1, video.shape[2]):
        torch.testing.assert_close(out[:, :, f], out[:, :, 0], rtol=0, atol=0)
    # Different parameters across the (identical) clips of the batch.
    distinct = {out[i].numpy().tobytes() for i in range(len(out))}
    assert len(distinct) >= len(out) // 2, f"only {len(distinct)} distinct outputs of {len(out)} clips"
    assert not torch.equal(out, video)
    # Reproducible under a seed, different under another.
    torch.manual_seed(3)
    torch.testing.assert_close(aug(video), out, rtol=0, atol=0)
    torch.manual_seed(4)
    assert not torch.equal(aug(video), out)
    # Moving clips: frames differ, and still no frame gets its own parameters (checked above);
    # empty batches pass through.
    assert aug(video[:0]).shape == (0, *video.shape[1:])


def test_clip_augment_rejects_bad_input():
    with pytest.raises(ValueError, match=r"uint8.*\[N,3,T,H,W\]"):
        clip_rand_augment(torch.zeros(2, 3, 4, 8, 8), 2, M)
    with pytest.raises(ValueError, match=r"video must be a uint8 tensor \[N,3,T,H,W\].*\(3, 4, 8, 8\)"):
        ClipAugment(rand_augment=(2, M))(torch.zeros(3, 4, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match="grayscale_p"):
        ClipAugment(grayscale_p=1.5)
    with pytest.raises(ValueError, match="color_jitter"):
        ClipAugment(color_jitter=(0.4, 0.4, 0.4))


def test_mix_clips_targets_match_the_mixed_pixels():
    n, k = 8, 8
    torch.manual_seed(0)
    x = torch.randn(n, 3, 2, 10, 12)
    label = torch.arange(n)  # one class per clip: a target row says how much of each clip is in
    for mixup, cutmix in ((0.8, 0.0), (0.0, 1.0), (0.8, 1.0)):
        torch.manual_seed(1)
        out, soft = mix_clips(x, label, k, mixup_alpha=mixup, cutmix_alpha=cutmix)
        assert out.shape == x.shape and soft.shape == (n, k)
        torch.testing.assert_close(soft.sum(1), torch.ones(n))
        for i in range(n):
            others = soft[i].clone()
            others[i] = 0
            j = int(others.argmax()) if float(others.max()) > 1e-6 else i  # the partner clip
            lam = float(soft[i, i]) if j != i else 1.0
            mixed_px = ~torch.isclose(out[i], x[i])
            if mixup and torch.allclose(out[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5):
                continue  # mixup: exactly the convex combination the target states
            # CutMix: a box, the same in every frame and channel, of area (1 - lam) taken from clip j.
            assert torch.equal(out[i][mixed_px], x[j][mixed_px])
            assert bool((mixed_px == mixed_px[:1, :1]).all())
            assert float(mixed_px.float().mean()) == pytest.approx(1 - lam, abs=1e-6)
    out, soft = mix_clips(x, label, k, 0.0, 0.0)
    assert torch.equal(out, x) and torch.equal(soft, torch.eye(k))
    with pytest.raises(ValueError, match="target"):
        mix_clips(x, label[:3], k, 0.8)


# ---------------------------------------------------------------------------- in VideoClassifier


def test_classifier_augmentation_off_by_default():
    model = VideoClassifier(TinyNet(2))
    assert model.clip_augment is None and not model.mixing
    video = _static_clips(2, 4, 8, 8)
    x, target = model.augment(video, torch.tensor([0, 1]))
    torch.testing.assert_close(x, model.normalize(video), rtol=0, atol=0)
    assert torch.equal(target, torch.tensor([0, 1]))
    # No parameters or buffers come with augmentation: checkpoints do not change.
    on = VideoClassifier(TinyNet(2), rand_augment=(2, M), mixup_alpha=0.2)
    assert on.state_dict().keys() == model.state_dict().keys()


def test_classifier_trains_with_every_augmentation_and_evaluates_without(tmp_path):
    pytest.importorskip("kornia")
    kw = dict(lr=0.2, warmup_epochs=0.5, weight_decay=1e-4, label_smoothing=0.1)
    model = VideoClassifier(
        TinyNet(2),
        color_jitter=(0.4, 0.4, 0.4, 0.1),
        grayscale_p=0.2,
        blur_p=0.5,
        rand_augment=(2, M),
        mixup_alpha=0.8,
        cutmix_alpha=1.0,
        **kw,
    )
    data = SquareData(n_train=24, n_eval=6, views=1)
    trainer = lightning_cpu_trainer(tmp_path, max_epochs=2, logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    loss, top1 = float(trainer.callback_metrics["train/loss"]), float(trainer.callback_metrics["train/top1"])
    assert math.isfinite(loss) and 0.0 <= top1 <= 1.0
    # Validation and test see the clips as they are: the same weights give the same metrics with
    # augmentation on and off.
    plain = VideoClassifier(TinyNet(2), **kw)
    plain.load_state_dict(model.state_dict())
    res = {}
    for name, m in (("aug", model), ("plain", plain)):
        lightning_cpu_trainer(tmp_path, logger=False, enable_checkpointing=False).validate(
            m, datamodule=data, verbose=False
        )
        res[name] = m.last_eval["val"]
    for key in ("top1", "loss", "clip_top1"):
        assert res["aug"][key] == pytest.approx(res["plain"][key], abs=1e-6), key


def test_classifier_augment_is_seeded_per_batch_and_leaves_the_global_rng():
    model = VideoClassifier(TinyNet(2), rand_augment=(2, M), cutmix_alpha=1.0)
    video, label = _static_clips(4, 2, 12, 12), torch.tensor([0, 1, 0, 1])
    state = torch.get_rng_state()
    a = model.augment(video, label, batch_idx=5)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG stream is left alone
    b = model.augment(video, label, batch_idx=5)
    c = model.augment(video, label, batch_idx=6)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a[0], c[0])


def test_clip_augment_ignores_autocast():
    """Under bf16-mixed, training_step runs in autocast: the pixel arithmetic (sharpness's smoothing
    conv, the affine grids, kornia's blur) must still be float32, as without it."""
    pytest.importorskip("kornia")
    augment = ClipAugment(rand_augment=(2, 27), blur_p=1.0)
    video = torch.randint(0, 256, (16, 3, 2, 24, 24), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(1)
    ref = augment(video)
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = augment(video)
    assert torch.equal(got, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_classifier_augment_on_cuda_is_seeded_and_leaves_the_cuda_rng():
    """On the device kornia draws its parameters with the CUDA generator: seeded per batch, and the
    global CUDA RNG stream (dropout's) comes back as it was."""
    pytest.importorskip("kornia")
    model = VideoClassifier(TinyNet(2), color_jitter=(0.4, 0.4, 0.4, 0.1), rand_augment=(2, M)).cuda()
    video, label = _static_clips(4, 2, 12, 12).cuda(), torch.tensor([0, 1, 0, 1]).cuda()
    state = torch.cuda.get_rng_state()
    a = model.augment(video, label, batch_idx=5)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    b = model.augment(video, label, batch_idx=5)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_clip_augment_draws_in_float32_after_a_dtype_cast():
    """kornia's generators follow `.to()` (device and dtype); a module cast by Lightning ("bf16-true")
    still draws its jitter factors in float32."""
    pytest.importorskip("kornia")
    video = torch.randint(0, 256, (8, 3, 2, 16, 16), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        augment = ClipAugment(color_jitter=(0.4, 0.4, 0.4, 0.1), color_jitter_p=1.0, blur_p=0.5).to(dtype)
        torch.manual_seed(3)
        outs.append(augment(video))
    assert torch.equal(outs[0], outs[1])
