"""Keyframe interval of prepared videos: file size against random-access clip decode time.

Re-encodes one real clip with `datamodules.prepare`'s encoder (H.264, its CRF and preset) at each
keyframe interval, then decodes training clips (`--frames` frames every `--interval`, random
starts, the same starts for every variant) with `datamodules.decode.VideoReader`, one thread.
The source file is timed too. Prints a Markdown table: bytes, keyframes, encode seconds, and the
fastest clip decode time of `--repeats` passes (interleaved) (each pass opens the file and decodes `--clips`
clips).

    python benchmarks/bench_prepare.py [--video PATH] [--short-side 320] [--gops 8 16 32 250]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from datamodules.decode import VideoReader, build_index
from datamodules.encode import pick_encoder
from datamodules.prepare import DEFAULT_CRF, PRESET, reencode_video

DEFAULT_VIDEO = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "videos" / "kinetics_arm_wrestling.mp4"


def clip_time(path: Path, starts: list[int], frames: int, interval: int) -> float:
    """Seconds per clip of one pass (the file opened once, every start decoded)."""
    t0 = time.perf_counter()
    with VideoReader(path, threads=1) as reader:
        for s in starts:
            reader.decode(np.arange(s, s + frames * interval, interval))
    return (time.perf_counter() - t0) / len(starts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", type=Path, default=DEFAULT_VIDEO)
    ap.add_argument("--short-side", type=int, default=320)
    ap.add_argument("--gops", type=int, nargs="+", default=[8, 16, 32, 250])
    ap.add_argument("--crf", type=int, default=DEFAULT_CRF)
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--interval", type=int, default=2)
    ap.add_argument("--clips", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    encoder = pick_encoder()
    n = build_index(args.video).num_frames
    span = (args.frames - 1) * args.interval + 1
    starts = np.random.default_rng(0).integers(0, n - span + 1, args.clips).tolist()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        variants = [("source", args.video, None)]
        for gop in args.gops:
            t0 = time.perf_counter()
            data, _ = reencode_video(args.video, args.short_side, gop=gop, crf=args.crf, encoder=encoder)
            seconds = time.perf_counter() - t0
            path = Path(tmp) / f"gop{gop}.mp4"
            path.write_bytes(data)
            variants.append((f"GOP {gop}", path, seconds))
        # Passes interleave the variants, so load from other jobs spreads over all of them.
        passes = {name: [] for name, _, _ in variants}
        for _ in range(args.repeats):
            for name, path, _ in variants:
                passes[name].append(clip_time(path, starts, args.frames, args.interval))
        for name, path, seconds in variants:
            index = build_index(path)
            size_px = f"{index.width}x{index.height}"
            rows.append((name, path.stat().st_size, len(index.keyframe_pts), size_px, seconds, min(passes[name])))
    base = next(r for r in rows if r[0] == f"GOP {args.gops[-1]}")
    print(
        f"{args.video.name}, {n} frames, {encoder} CRF {args.crf} preset {PRESET}; clips of {args.frames} frames "
        f"every {args.interval}, {args.clips} random starts, fastest of {args.repeats} interleaved passes\n"
    )
    print("| file | size | bytes vs last | keyframes | size px | encode s | ms per clip | clip time vs last |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for name, size, keys, px, seconds, clip in rows:
        enc = "-" if seconds is None else f"{seconds:.2f}"
        print(
            f"| {name} | {size / 1e3:.0f} kB | {size / base[1]:.2f}x | {keys} | {px} | {enc} | {1e3 * clip:.1f} "
            f"| {clip / base[5]:.2f}x |"
        )


if __name__ == "__main__":
    main()
