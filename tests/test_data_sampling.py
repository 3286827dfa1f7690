"""Clip index sampling and uint8 transforms."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.sampling import clip_span, eval_clip_indices, train_clip_indices
from datamodules.transforms import ClipTransform


def test_dense_training_clip_is_in_range_and_strided():
    rng = np.random.default_rng(0)
    starts = set()
    for _ in range(200):
        idx = train_clip_indices(100, 8, 3, rng)
        assert idx.dtype == np.int64 and idx.shape == (8,)
        np.testing.assert_array_equal(np.diff(idx), 3)
        assert 0 <= idx[0] and idx[-1] < 100
        starts.add(int(idx[0]))
    assert min(starts) == 0 and max(starts) == 100 - clip_span(8, 3)  # the full start range is used


def test_short_video_loop_and_repeat_last():
    rng = np.random.default_rng(0)
    np.testing.assert_array_equal(train_clip_indices(5, 8, 1, rng, short_video="loop"), [0, 1, 2, 3, 4, 0, 1, 2])
    np.testing.assert_array_equal(train_clip_indices(5, 8, 1, rng, short_video="repeat_last"), [0, 1, 2, 3, 4, 4, 4, 4])
    np.testing.assert_array_equal(eval_clip_indices(1, 3, 2, 2), [[0, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="short_video"):
        train_clip_indices(5, 8, 1, rng, short_video="pad")


def test_segment_sampling_one_frame_per_segment():
    rng = np.random.default_rng(1)
    for _ in range(50):
        idx = train_clip_indices(80, 8, 1, rng, sampling="segment")
        np.testing.assert_array_equal(idx // 10, np.arange(8))  # segment k = frames [10k, 10k+10)
    np.testing.assert_array_equal(eval_clip_indices(80, 4, 1, 1, sampling="segment"), [[10, 30, 50, 70]])
    # Fewer frames than segments: every index valid.
    assert eval_clip_indices(3, 8, 1, 2, sampling="segment").max() < 3


def test_test_clips_evenly_spaced():
    clips = eval_clip_indices(100, 4, 2, 3)
    assert clips.shape == (3, 4)
    np.testing.assert_array_equal(clips[:, 0], [0, 46, 93])  # first ... last possible start (93)
    np.testing.assert_array_equal(eval_clip_indices(100, 4, 2, 1)[:, 0], [46])  # centred
    with pytest.raises(ValueError, match="test_clips"):
        eval_clip_indices(100, 4, 2, 0)


def _clip(t=4, h=40, w=60):
    x = torch.arange(t * h * w * 3, dtype=torch.int64).reshape(t, h, w, 3) % 251
    return x.to(torch.uint8).numpy()


def test_train_transform_random_crop_and_flip():
    tf = ClipTransform(train=True, short_side=(40, 48), crop_size=32, flip=True)
    rng = np.random.default_rng(0)
    sides = {tf.decode_short_side(rng) for _ in range(100)}
    assert sides <= set(range(40, 49)) and len(sides) > 3
    frames = _clip()
    flipped = 0
    for _ in range(20):
        [v] = tf(frames, rng)
        assert v.dtype == torch.uint8 and v.shape == (3, 4, 32, 32)
        src = torch.from_numpy(frames).permute(3, 0, 1, 2)
        # The view is a crop of the source, possibly mirrored.
        found = any(torch.equal(v, src[:, :, y : y + 32, x : x + 32]) for y in range(9) for x in range(29))
        if not found:
            flipped += 1
            assert any(torch.equal(v.flip(3), src[:, :, y : y + 32, x : x + 32]) for y in range(9) for x in range(29))
    assert 0 < flipped < 20


def test_random_resized_crop_and_eval_crops():
    rng = np.random.default_rng(0)
    rrc = ClipTransform(train=True, short_side=(40, 40), crop_size=24, crop="random_resized")
    [v] = rrc(_clip(), rng)
    assert v.shape == (3, 4, 24, 24) and v.dtype == torch.uint8
    three = ClipTransform(train=False, short_side=(40, 40), crop_size=40, num_crops=3)
    views = three(_clip(), rng)
    src = torch.from_numpy(_clip()).permute(3, 0, 1, 2)
    assert [tuple(v.shape) for v in views] == [(3, 4, 40, 40)] * 3
    for v, x0 in zip(views, (0, 10, 20), strict=True):  # left / centre / right of a 60-wide frame
        assert torch.equal(v, src[:, :, :, x0 : x0 + 40])
    portrait = torch.from_numpy(_clip(h=60, w=40)).permute(3, 0, 1, 2)
    views = three(_clip(h=60, w=40), rng)
    for v, y0 in zip(views, (0, 10, 20), strict=True):  # top / centre / bottom
        assert torch.equal(v, portrait[:, :, y0 : y0 + 40])


def test_transform_validation():
    with pytest.raises(ValueError, match="num_crops"):
        ClipTransform(train=False, short_side=(8, 8), crop_size=8, num_crops=2)
    with pytest.raises(ValueError, match="short_side"):
        ClipTransform(train=True, short_side=(9, 8), crop_size=8)
    tf = ClipTransform(train=False, short_side=(8, 8), crop_size=8)
    with pytest.raises(ValueError, match=r"frames: expected uint8 \[T,H,W,3\]"):
        tf(np.zeros((2, 8, 8, 3), np.float32), np.random.default_rng(0))
