"""Which frames a clip takes: dense clips at a frame interval, or TSN-style segments.

All functions return int64 frame indices into a video (or time window) of `num_video_frames`
frames. Videos shorter than a clip's span either loop back to the start ("loop") or hold their
last frame ("repeat_last").
"""

from __future__ import annotations

from typing import Literal

import numpy as np

Sampling = Literal["dense", "segment"]
ShortVideo = Literal["loop", "repeat_last"]

__all__ = ["Sampling", "ShortVideo", "clip_span", "eval_clip_indices", "train_clip_indices"]


def clip_span(num_frames: int, frame_interval: int) -> int:
    """Frames covered by a dense clip: (num_frames - 1) * frame_interval + 1."""
    return (num_frames - 1) * frame_interval + 1


def _check(num_video_frames: int, num_frames: int, frame_interval: int, short_video: str) -> None:
    if num_video_frames < 1:
        raise ValueError(f"num_video_frames: expected >= 1, got {num_video_frames}")
    if num_frames < 1:
        raise ValueError(f"num_frames: expected >= 1, got {num_frames}")
    if frame_interval < 1:
        raise ValueError(f"frame_interval: expected >= 1, got {frame_interval}")
    if short_video not in ("loop", "repeat_last"):
        raise ValueError(f"short_video: expected 'loop' or 'repeat_last', got {short_video!r}")


def _fit(indices: np.ndarray, n: int, short_video: str) -> np.ndarray:
    if short_video == "loop":
        return np.mod(indices, n)
    return np.minimum(indices, n - 1)


def _dense(start: int, n: int, num_frames: int, frame_interval: int, short_video: str) -> np.ndarray:
    return _fit(start + np.arange(num_frames, dtype=np.int64) * frame_interval, n, short_video)


def _segments(n: int, num_frames: int) -> tuple[np.ndarray, np.ndarray]:
    """Start and length of `num_frames` equal segments covering [0, n) (lengths >= 1 by looping)."""
    edges = np.linspace(0, max(n, num_frames), num_frames + 1)
    starts = np.floor(edges[:-1]).astype(np.int64)
    lengths = np.maximum(np.floor(edges[1:]).astype(np.int64) - starts, 1)
    return starts, lengths


def train_clip_indices(
    num_video_frames: int,
    num_frames: int,
    frame_interval: int,
    rng: np.random.Generator,
    *,
    sampling: Sampling = "dense",
    short_video: ShortVideo = "loop",
) -> np.ndarray:
    """A random training clip: dense (uniform random start) or segment (a random frame per segment)."""
    _check(num_video_frames, num_frames, frame_interval, short_video)
    n = num_video_frames
    if sampling == "dense":
        span = clip_span(num_frames, frame_interval)
        start = int(rng.integers(0, n - span + 1)) if n >= span else 0
        return _dense(start, n, num_frames, frame_interval, short_video)
    if sampling == "segment":
        starts, lengths = _segments(n, num_frames)
        idx = starts + (rng.random(num_frames) * lengths).astype(np.int64)
        return _fit(idx, n, short_video)
    raise ValueError(f"sampling: expected 'dense' or 'segment', got {sampling!r}")


def eval_clip_indices(
    num_video_frames: int,
    num_frames: int,
    frame_interval: int,
    test_clips: int,
    *,
    sampling: Sampling = "dense",
    short_video: ShortVideo = "loop",
) -> np.ndarray:
    """`test_clips` deterministic clips, int64 [test_clips, num_frames].

    Dense: starts evenly spaced from the first to the last possible start (one clip: centred).
    Segment: clip k takes the frame at fraction (k + 0.5) / test_clips of every segment.
    """
    _check(num_video_frames, num_frames, frame_interval, short_video)
    if test_clips < 1:
        raise ValueError(f"test_clips: expected >= 1, got {test_clips}")
    n = num_video_frames
    if sampling == "dense":
        span = clip_span(num_frames, frame_interval)
        last = max(n - span, 0)
        if test_clips == 1:
            starts = [last // 2]
        else:
            starts = np.round(np.linspace(0, last, test_clips)).astype(np.int64).tolist()
        return np.stack([_dense(s, n, num_frames, frame_interval, short_video) for s in starts])
    if sampling == "segment":
        seg_starts, lengths = _segments(n, num_frames)
        frac = (np.arange(test_clips) + 0.5) / test_clips
        idx = seg_starts[None, :] + (frac[:, None] * lengths[None, :]).astype(np.int64)
        return _fit(idx, n, short_video)
    raise ValueError(f"sampling: expected 'dense' or 'segment', got {sampling!r}")
