"""Decode benchmark: clips/s of one worker for training clips, ours vs the naive PyAV approach.

A clip is `num_frames` frames at `frame_interval`, resized to `short_side`, from a random start.
Naive: seek to the clip's start time, decode every frame of the window to full-size RGB, then slice
and resize with torch. Ours (datamodules.decode): packet index (demuxed per clip, no cache), seek to
the keyframe, drop non-reference frames before the clip, convert/resize only the kept frames in
swscale. Both run in this process, one after the other, on the same random starts, with the
decoder's thread count set explicitly; the ratio is printed.

Frames vs video: the same clip's frames are extracted once as JPEG files (PyAV decode, Pillow encode
at `--jpeg-quality`) into a temporary folder, and the same clips are read from them
(datamodules.frames: only the sampled files, DCT-scaled JPEG decoding), with and without the
reduced-scale decoding, when `--frames` is given.

    python benchmarks/bench_decode.py [--video PATH] [--clips 60] [--repeats 3] [--threads 1] [--short-side 256]
                                      [--frames [--jpeg-quality 90]]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F

from datamodules.decode import IndexCache, VideoReader, build_index, output_size
from datamodules.frames import FrameFolderReader, frame_index

DEFAULT_VIDEO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos" / "kinetics_arm_wrestling.mp4"


def naive_clip(path: str, start_time: float, num_frames: int, interval: int, short_side: int, threads: int):
    """Decode every frame from `start_time` to full-size RGB, then slice and resize."""
    span = (num_frames - 1) * interval + 1
    with av.open(path) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = threads
        stream.codec_context.thread_type = "AUTO" if threads > 1 else "SLICE"
        container.seek(int(start_time / stream.time_base), stream=stream, backward=True)
        frames = []
        for frame in container.decode(stream):
            if frame.time is not None and frame.time < start_time - 1e-6:
                continue
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) == span:
                break
    clip = torch.from_numpy(np.stack(frames[::interval]))  # [T,H,W,3]
    h, w = clip.shape[1:3]
    ow, oh = output_size(w, h, short_side)
    x = clip.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)
    return x.round().clamp(0, 255).to(torch.uint8)


def ours_clip(path: str, start: int, num_frames: int, interval: int, short_side: int, threads: int, cache=None):
    """datamodules.decode: packet index (demuxed per clip unless `cache` holds it), keyframe seek,
    non-reference frames outside the clip dropped by the decoder, swscale conversion of kept frames."""
    index = cache.get(path) if cache is not None else None
    with VideoReader(path, threads=threads, index=index) as reader:
        frames = reader.decode(np.arange(num_frames) * interval + start, short_side=short_side)
    return torch.from_numpy(frames).permute(0, 3, 1, 2)


def extract_jpegs(path: str, folder: Path, quality: int) -> int:
    """Write every frame of `path` as `folder/img_00001.jpg`, ... (PyAV decode, Pillow encode)."""
    n = 0
    with av.open(path) as container:
        for n, frame in enumerate(container.decode(video=0), start=1):
            frame.to_image().save(folder / f"img_{n:05d}.jpg", quality=quality)
    return n


def frames_clip(folder: str, start: int, num_frames: int, interval: int, short_side: int, index, dct: bool = True):
    """datamodules.frames: open only the clip's JPEGs, decode at the smallest DCT scale >= the target."""
    reader = FrameFolderReader(folder, index=index)
    if not dct:  # the same reader with Pillow's reduced-scale decoding turned off, for comparison
        reader.decode_full_scale = True
    frames = reader.decode(np.arange(num_frames) * interval + start, short_side=short_side)
    return torch.from_numpy(frames).permute(0, 3, 1, 2)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", default=str(DEFAULT_VIDEO))
    ap.add_argument("--clips", type=int, default=60, help="clips per timed repeat")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--num-frames", type=int, default=16)
    ap.add_argument("--frame-interval", type=int, default=2)
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1, help="decoder threads per worker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--frames", action="store_true", help="add the frames-vs-video cases (JPEGs of the same clip)")
    ap.add_argument("--jpeg-quality", type=int, default=90, help="quality of the extracted JPEG frames")
    args = ap.parse_args(argv)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # one DataLoader worker's share
    try:
        if not args.frames:
            return _run(args, None)
        with tempfile.TemporaryDirectory(prefix="vmm_bench_frames_") as tmp:
            return _run(args, Path(tmp))
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, frames_dir: Path | None) -> dict[str, float]:

    index = build_index(args.video)
    span = (args.num_frames - 1) * args.frame_interval + 1
    rng = np.random.default_rng(args.seed)
    starts = rng.integers(0, index.num_frames - span + 1, size=args.clips)
    start_times = index.times(starts)

    # Both produce the same frames (same size; values differ only by the resize implementation).
    a = naive_clip(args.video, float(start_times[0]), args.num_frames, args.frame_interval, args.short_side, 1)
    b = ours_clip(args.video, int(starts[0]), args.num_frames, args.frame_interval, args.short_side, 1)
    assert a.shape == b.shape, (a.shape, b.shape)

    cache = IndexCache()
    cache.get(args.video)
    variants = {
        "naive": lambda s, t: naive_clip(
            args.video, t, args.num_frames, args.frame_interval, args.short_side, args.threads
        ),
        "ours": lambda s, t: ours_clip(
            args.video, s, args.num_frames, args.frame_interval, args.short_side, args.threads
        ),
        "ours, index cached": lambda s, t: ours_clip(
            args.video, s, args.num_frames, args.frame_interval, args.short_side, args.threads, cache
        ),
    }
    if frames_dir is not None:
        n_jpeg = extract_jpegs(args.video, frames_dir, args.jpeg_quality)
        findex = frame_index(frames_dir)
        assert findex.num_frames == n_jpeg == index.num_frames, (n_jpeg, index.num_frames)
        c = frames_clip(str(frames_dir), int(starts[0]), args.num_frames, args.frame_interval, args.short_side, findex)
        assert c.shape == b.shape, (c.shape, b.shape)
        diff = (c.float() - b.float()).abs().mean().item()
        print(f"frames vs video, first clip: mean |difference| {diff:.2f} grey levels (JPEG q{args.jpeg_quality})")
        variants["frames (JPEG, DCT-scaled)"] = lambda s, t: frames_clip(
            str(frames_dir), s, args.num_frames, args.frame_interval, args.short_side, findex
        )
        variants["frames (JPEG, full scale)"] = lambda s, t: frames_clip(
            str(frames_dir), s, args.num_frames, args.frame_interval, args.short_side, findex, dct=False
        )
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():  # interleaved, so background load affects all alike
            t0 = time.perf_counter()
            for s, t in zip(starts.tolist(), start_times.tolist(), strict=True):
                fn(s, t)
            rates[name].append(args.clips / (time.perf_counter() - t0))
    med = {name: statistics.median(r) for name, r in rates.items()}
    print(f"video: {args.video} ({index.width}x{index.height}, {index.num_frames} frames, {index.fps:.2f} fps)")
    print(
        f"clip: {args.num_frames} frames @ interval {args.frame_interval}, short side {args.short_side}, "
        f"decoder threads {args.threads}, one process, {args.clips} clips x {args.repeats} repeats (median)"
    )
    for name, rate in med.items():
        print(f"{name:<26} {rate:8.1f} clips/s   {rate / med['naive']:5.2f}x naive")
    return med


if __name__ == "__main__":
    main()
