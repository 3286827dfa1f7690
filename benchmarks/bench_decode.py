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

Peers (`--peers`): vmm's readers against PyAV naive, decord2 and torchcodec (when they load) on
the same clips of six workloads generated from the real clip in ../shared/data/videos (a
Kinetics-style 340x256 H.264 file, a 1920x1080 H.264 "raw download", an SSv2-style 427x240 VP9
WebM, a JPEG frame folder, a "prepared" 568x320 H.264 file with a GOP of 16, and that file's bytes
read from a tar shard), four recipes (8x8, 16x4, 32x2, TSN 8 segments) and pools of 1 and 2
worker processes; a reader is opened per clip, as in a DataLoader worker. "limit" decodes only the
frames the GOP forces (keyframe to each sampled frame) and converts nothing. A feed section times
the paper recipes (SIFA 16x1 at short side 256, FCF 16x2 at 128, TSN 16) for vmm alone.

    python benchmarks/bench_decode.py --peers [--quick] [--workdir DIR] [--clips 16] [--workers 1 2]
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path
from typing import NamedTuple

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules.decode import IndexCache, VideoReader, build_index, output_size
from datamodules.frames import FrameFolderReader, frame_index
from datamodules.sampling import train_clip_indices

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


def main(argv: list[str] | None = None) -> dict:
    argv = list(argv) if argv is not None else None
    if "--peers" in (argv if argv is not None else sys.argv[1:]):
        return peers_main(argv)
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


# ---------------------------------------------------------------------------------------------------
# Peers: vmm against PyAV naive, decord2 and torchcodec, per workload x recipe x worker count.

SHARED_VIDEOS = DEFAULT_VIDEO.parent
# (name, num_frames, frame_interval); interval 0 = TSN segments (one random frame per segment).
RECIPES = [("8x8", 8, 8), ("16x4", 16, 4), ("32x2", 32, 2), ("tsn8", 8, 0)]
# The paper recipes of configs/sifa_r50_*.yaml and configs/fcf_r2plus1d50_*.yaml: (name, frames,
# interval, short side); the feed section times them for vmm on the workloads a training run reads.
FEED_RECIPES = [("sifa 16x1 @256", 16, 1, 256), ("fcf 16x2 @128", 16, 2, 128), ("tsn16 @256", 16, 0, 256)]
FEED_WORKLOADS = ("1080p h264", "prepared 320p", "shard (bytes)")


class Workload(NamedTuple):
    """One kind of stored video: what the readers open, and the frame count every clip samples from."""

    name: str
    kind: str  # "file" (a video path), "frames" (a JPEG folder) or "shard" (a tar member read into memory)
    path: str
    num_frames: int
    size: tuple[int, int]  # stored (width, height)
    note: str
    member: str = ""  # the tar member of a shard


def _source_frames(path: Path, crop_16_9: bool) -> list[np.ndarray]:
    """The real clip's frames as RGB arrays, optionally centre-cropped to 16:9."""
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    if crop_16_9:
        h, w = frames[0].shape[:2]
        ch = min(h, round(w * 9 / 16))
        top = (h - ch) // 2
        frames = [np.ascontiguousarray(f[top : top + ch]) for f in frames]
    return frames


def _encode(
    path: Path,
    frames: list[np.ndarray],
    size: tuple[int, int],
    fps: int,
    codec: str,
    options: dict,
    gop: int | None = None,
    bit_rate: int | None = None,
) -> None:
    """Encode RGB `frames` scaled to `size` (swscale bicubic) with PyAV."""
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = dict(options)
        if gop is not None:
            stream.codec_context.gop_size = gop
        if bit_rate is not None:
            stream.codec_context.bit_rate = bit_rate
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(
                width=size[0], height=size[1], format="yuv420p", interpolation="BICUBIC"
            )
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


# SSv2-style VP9 (the realtime encoder the dataset's WebM files resemble: few keyframes, no B-frames)
VP9_OPTIONS = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b": "0"}
WORKLOAD_NAMES = ("kinetics 340x256", "1080p h264", "ssv2 vp9 427x240", "jpeg frames", "prepared 320p", "shard (bytes)")


def make_workloads(workdir: Path, source: Path, only: list[str] | None = None) -> list[Workload]:
    """Generate (or reuse, when `workdir` already holds them) the workloads from the real clip;
    `only`: substrings of the names to make (default: all six)."""
    import tarfile

    names = [n for n in WORKLOAD_NAMES if not only or any(o in n for o in only)]
    if not names:
        raise ValueError(f"only: expected substrings of {WORKLOAD_NAMES}, got {only}")
    workdir.mkdir(parents=True, exist_ok=True)
    index = build_index(source)
    fps = round(index.fps)
    frames_cache: dict[bool, list[np.ndarray]] = {}

    def frames(wide: bool) -> list[np.ndarray]:
        if wide not in frames_cache:
            frames_cache[wide] = _source_frames(source, crop_16_9=wide)
        return frames_cache[wide]

    def made(name: str, make) -> Path:
        path = workdir / name
        if not path.exists():
            make(workdir / f"tmp_{name}")
            (workdir / f"tmp_{name}").rename(path)
        return path

    def info(p: Path) -> tuple[int, tuple[int, int], str]:
        ix = build_index(p)
        with av.open(str(p)) as c:
            codec = c.streams.video[0].codec_context.name
        kbps = p.stat().st_size * 8 / ix.duration / 1000
        note = f"{codec}, {ix.keyframe_pts.size} keyframes, {ix.fps:.0f} fps, {kbps:.0f} kb/s"
        return ix.num_frames, (ix.width, ix.height), note

    def jpegs(folder: Path) -> None:
        folder.mkdir()
        for i, rgb in enumerate(frames(False), start=1):
            Image.fromarray(rgb).save(folder / f"img_{i:05d}.jpg", quality=90)

    def prepared() -> Path:
        # what a prepare step writes: short side 320, H.264 with a keyframe every 16 frames
        return made(
            "prepared.mp4",
            lambda p: _encode(p, frames(True), (568, 320), fps, "libx264", {"preset": "veryfast", "crf": "23"}, 16),
        )

    def shard(p: Path) -> None:
        with tarfile.open(p, "w") as tar:
            tar.add(prepared(), arcname="000000.mp4")

    out = []
    for name in names:
        if name == "kinetics 340x256":
            out.append(Workload(name, "file", str(source), *info(source)))
        elif name == "1080p h264":
            # a 1080p download as ffmpeg's libx264 defaults write it (keyframe interval 250, B-frames)
            path = made(
                "1080p.mp4",
                lambda p: _encode(
                    p, frames(True), (1920, 1080), fps, "libx264", {"preset": "veryfast"}, 250, 4_000_000
                ),
            )
            out.append(Workload(name, "file", str(path), *info(path)))
        elif name == "ssv2 vp9 427x240":
            path = made("ssv2.webm", lambda p: _encode(p, frames(True), (427, 240), 12, "libvpx-vp9", VP9_OPTIONS))
            out.append(Workload(name, "file", str(path), *info(path)))
        elif name == "jpeg frames":
            folder = made("frames", jpegs)
            note = (
                f"{index.width}x{index.height} JPEG q90 of the kinetics clip; naive: Pillow, full-scale decode + resize"
            )
            out.append(Workload(name, "frames", str(folder), index.num_frames, (index.width, index.height), note))
        elif name == "prepared 320p":
            path = prepared()
            out.append(Workload(name, "file", str(path), *info(path)))
        else:
            n, size, _ = info(prepared())
            note = "prepared 320p, read from a tar into memory"
            out.append(Workload(name, "shard", str(made("shard-000000.tar", shard)), n, size, note, "000000.mp4"))
    return out


def _shard_bytes(w: Workload) -> bytes:
    import tarfile

    with tarfile.open(w.path) as tar:
        member = tar.extractfile(w.member)
        assert member is not None
        return member.read()


# Readers: each takes (workload, sorted unique frame indices, (width, height)) and returns the clip,
# uint8 [T, H, W, 3] RGB (limit returns the number of frames it decoded).


def read_vmm(w: Workload, idx: np.ndarray, size: tuple[int, int], short_side: int) -> np.ndarray:
    if w.kind == "frames":
        return FrameFolderReader(w.path).decode(idx, short_side=short_side)
    source = _shard_bytes(w) if w.kind == "shard" else w.path
    with VideoReader(source, threads=1) as reader:
        return reader.decode(idx, short_side=short_side)


def read_naive(w: Workload, idx: np.ndarray, size: tuple[int, int], short_side: int) -> np.ndarray:
    """Open, decode every frame from the start to the last sampled one, convert each to RGB, keep
    the sampled ones, resize (torch bilinear, antialiased)."""
    if w.kind == "frames":
        # The naive frame-folder read: every sampled JPEG at full scale, then a Pillow resize.
        files = sorted(os.listdir(w.path))
        clip = []
        for i in idx.tolist():
            with Image.open(os.path.join(w.path, files[i])) as im:
                clip.append(np.asarray(im.convert("RGB").resize(size, Image.BILINEAR)))
        return np.stack(clip)
    source = io.BytesIO(_shard_bytes(w)) if w.kind == "shard" else w.path
    last = int(idx.max())
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        frames = []
        for frame in container.decode(stream):
            frames.append(frame.to_ndarray(format="rgb24"))
            if len(frames) > last:
                break
    clip = torch.from_numpy(np.stack([frames[i] for i in idx.tolist()])).permute(0, 3, 1, 2).float()
    if clip.shape[-1] != size[0] or clip.shape[-2] != size[1]:
        clip = F.interpolate(clip, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
    return clip.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_decord(w: Workload, idx: np.ndarray, size: tuple[int, int], short_side: int) -> np.ndarray:
    import decord

    source = io.BytesIO(_shard_bytes(w)) if w.kind == "shard" else w.path
    vr = decord.VideoReader(source, width=size[0], height=size[1], num_threads=1)
    return vr.get_batch(idx.tolist()).asnumpy()


def read_torchcodec(w: Workload, idx: np.ndarray, size: tuple[int, int], short_side: int) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder

    source = _shard_bytes(w) if w.kind == "shard" else w.path
    decoder = VideoDecoder(source, num_ffmpeg_threads=1, seek_mode="exact")
    clip = decoder.get_frames_at(idx.tolist()).data.float()  # [T, 3, H, W]
    if clip.shape[-1] != size[0] or clip.shape[-2] != size[1]:
        clip = F.interpolate(clip, size=(size[1], size[0]), mode="bilinear", align_corners=False, antialias=True)
    return clip.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def read_limit(w: Workload, idx: np.ndarray, size: tuple[int, int], short_side: int, index=None) -> int:
    """Decode only what the GOP structure forces: from the keyframe at or before each sampled frame up
    to it (runs that share a keyframe decoded in one pass), frames not converted. The frame index is
    given (not timed): the bound for decoding, not for opening a file."""
    source = io.BytesIO(_shard_bytes(w)) if w.kind == "shard" else w.path
    pts = index.all_pts
    key_pos = np.searchsorted(pts, index.keyframe_pts)
    decoded = 0
    with av.open(source) as container:
        stream = container.streams.video[0]
        stream.codec_context.thread_count = 1
        targets = idx.tolist()
        k = 0
        while k < len(targets):
            key = int(key_pos[max(0, int(np.searchsorted(key_pos, targets[k], side="right")) - 1)])
            # extend the run while the next target's keyframe is not after the previous target
            stop = k + 1
            while stop < len(targets):
                nk = int(key_pos[max(0, int(np.searchsorted(key_pos, targets[stop], side="right")) - 1)])
                if nk > targets[stop - 1]:
                    break
                stop += 1
            want = {int(pts[t]) for t in targets[k:stop]}
            container.seek(int(pts[key]), stream=stream, backward=True, any_frame=False)
            for frame in container.decode(stream):
                decoded += 1
                want.discard(frame.pts)
                if not want:
                    break
            assert not want, f"limit: frames {sorted(want)} not decoded"
            k = stop
    return decoded


READERS = {
    "vmm": read_vmm,
    "pyav naive": read_naive,
    "decord2": read_decord,
    "torchcodec": read_torchcodec,
    "limit": read_limit,
}


def peer_availability() -> dict[str, str]:
    """'' for a reader that loads, else why it does not (the import error, verbatim)."""
    why = {}
    try:
        import decord  # noqa: F401
    except Exception as exc:  # noqa: BLE001 -- any import failure is reported, not raised
        why["decord2"] = f"{type(exc).__name__}: {exc}"
    try:
        from torchcodec.decoders import VideoDecoder  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        why["torchcodec"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        cause = exc.__cause__
        if cause is not None:
            why["torchcodec"] += f" (caused by {type(cause).__name__}: {str(cause).splitlines()[0]})"
    return why


def recipe_clips(n: int, frames: int, interval: int, count: int, seed: int) -> list[np.ndarray]:
    """`count` training clips (datamodules.sampling), sorted unique indices, from a fixed seed."""
    rng = np.random.default_rng(seed)
    sampling = "segment" if interval == 0 else "dense"
    return [np.unique(train_clip_indices(n, frames, max(interval, 1), rng, sampling=sampling)) for _ in range(count)]


# Worker-side state (set in the parent before the pool forks).
_JOBS: dict = {}


def _job(key) -> float:
    """One clip in a pool worker: (reader, workload number, recipe name, clip number, short side).
    Returns the worker's CPU seconds for it (all its threads)."""
    reader, wi, recipe, ci, short_side = key
    w = _JOBS["workloads"][wi]
    idx = _JOBS["clips"][(wi, recipe)][ci]
    size = _target_size(w, short_side)
    cpu0 = time.process_time()
    if reader == "limit":
        read_limit(w, idx, size, short_side, _JOBS["indexes"][wi])
    else:
        READERS[reader](w, idx, size, short_side)
    return time.process_time() - cpu0


def _target_size(w: Workload, short_side: int) -> tuple[int, int]:
    return output_size(w.size[0], w.size[1], short_side)


def _worker_init() -> None:
    torch.set_num_threads(1)


def check_readers(
    w: Workload, index, clips: list[np.ndarray], readers: list[str], short_side: int, size, checked: int = 2
) -> str:
    """Every reader returns the frames vmm returns: each frame within a colour-conversion / resize
    tolerance of vmm's frame at the same index, and never clearly nearer (by 0.5 grey levels) to
    vmm's frame at the index before or after. Returns, per reader, the mean |difference| and how
    many frames were decisively nearest their own index (motion large enough to tell)."""
    stats: dict[str, list[float]] = {}
    n = w.num_frames
    for idx in clips[:checked]:
        ref = read_vmm(w, idx, size, short_side)
        near = np.unique(np.clip(np.concatenate([idx - 1, idx + 1]), 0, n - 1))
        nb = dict(zip(near.tolist(), read_vmm(w, near, size, short_side), strict=True))
        for name in readers:
            if name in ("vmm", "limit"):
                continue
            got = READERS[name](w, idx, size, short_side)
            assert got.shape == ref.shape, f"{w.name} {name}: shape {got.shape}, vmm {ref.shape}"
            st = stats.setdefault(name, [0.0, 0, 0])
            for k, i in enumerate(idx.tolist()):
                d = float(np.abs(got[k].astype(np.int16) - ref[k]).mean())
                d_nb = min(
                    float(np.abs(got[k].astype(np.int16) - nb[j]).mean()) for j in (i - 1, i + 1) if j in nb and j != i
                )
                assert d <= 6.0, f"{w.name} {name}: frame {i} differs from vmm's by {d:.2f} grey levels"
                assert d <= d_nb + 0.5, f"{w.name} {name}: frame {i} is nearer vmm's neighbour ({d:.2f} vs {d_nb:.2f})"
                st[0] += d
                st[1] += 1
                st[2] += int(d + 0.5 < d_nb)
        if "limit" in readers and w.kind != "frames":
            read_limit(w, idx, size, short_side, index)
    return ", ".join(f"{k} {v[0] / v[1]:.2f} ({v[2]}/{v[1]} decisive)" for k, v in stats.items())


def peers_main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="decode peers: " + __doc__.splitlines()[0])
    ap.add_argument("--peers", action="store_true", required=True)
    ap.add_argument("--source", default=str(DEFAULT_VIDEO), help="the real clip the workloads are made from")
    ap.add_argument("--workdir", default=None, help="keep the generated workloads here (default: a temp dir)")
    ap.add_argument("--clips", type=int, default=12, help="clips per cell (a third of it for 1080p; >= 2 per worker)")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--short-side", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="smoke test: 2 clips, one recipe, one worker, no feed")
    ap.add_argument("--no-feed", action="store_true", help="skip the paper-recipe feed section")
    ap.add_argument("--only", nargs="+", default=None, help="workload names (substrings) to run")
    args = ap.parse_args(argv)
    if args.quick:
        args.clips, args.workers, args.no_feed = 2, [1], True
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if args.workdir:
            return _peers(args, Path(args.workdir))
        with tempfile.TemporaryDirectory(prefix="vmm_bench_peers_") as tmp:
            return _peers(args, Path(tmp))
    finally:
        torch.set_num_threads(threads_before)


def _versions(why: dict[str, str]) -> str:
    parts = [f"PyAV {av.__version__} (FFmpeg libavcodec {'.'.join(map(str, av.library_versions['libavcodec']))})"]
    if "decord2" in why:
        parts.append(f"decord2 unavailable: {why['decord2']}")
    else:
        import decord

        parts.append(f"decord2 {decord.__version__}")
    if "torchcodec" in why:
        parts.append(f"torchcodec unavailable: {why['torchcodec']}")
    else:
        import torchcodec

        parts.append(f"torchcodec {torchcodec.__version__}")
    return "; ".join(parts)


def _peers(args: argparse.Namespace, workdir: Path) -> dict:
    t_start = time.perf_counter()
    why = peer_availability()
    readers = [r for r in READERS if r not in why]
    print(_versions(why))
    workloads = make_workloads(workdir, Path(args.source), args.only)
    print(f"workloads ready in {time.perf_counter() - t_start:.0f} s ({workdir})")
    recipes = RECIPES[1:2] if args.quick else RECIPES
    indexes = [build_index(w.path) if w.kind == "file" else None for w in workloads]
    for wi, w in enumerate(workloads):
        if w.kind == "shard":
            indexes[wi] = build_index(_shard_bytes(w), name=w.member)
    clips: dict = {}
    counts = []
    for wi, w in enumerate(workloads):
        count = max(2 * max(args.workers), args.clips // 3 if w.size[1] >= 720 else args.clips)
        counts.append(count)
        for name, frames, interval in recipes:
            clips[(wi, name)] = recipe_clips(w.num_frames, frames, interval, count, args.seed)
        if not args.no_feed and w.name in FEED_WORKLOADS:
            for name, frames, interval, _ in FEED_RECIPES:
                clips[(wi, name)] = recipe_clips(w.num_frames, frames, interval, count, args.seed)
    print(f"frames vs vmm (mean |difference|, grey levels, first clips of {recipes[0][0]}):")
    for wi, w in enumerate(workloads):
        usable = [r for r in readers if not (w.kind == "frames" and r in ("decord2", "torchcodec", "limit"))]
        size = _target_size(w, args.short_side)
        print(
            f"  {w.name}: "
            + check_readers(
                w, indexes[wi], clips[(wi, recipes[0][0])], usable, args.short_side, size, 1 if args.quick else 2
            )
        )
    _JOBS.update(workloads=workloads, clips=clips, indexes=indexes)
    ctx = get_context("fork")
    pools = {n: ctx.Pool(n, initializer=_worker_init) for n in args.workers}
    results: dict = {}  # pool clips/s (wall clock)
    cpu_rates: dict = {}  # clips per CPU second of the workers (per core, whatever else runs)
    try:
        for pool in pools.values():
            pool.map(_worker_init_noop, range(8))
        for wi, w in enumerate(workloads):
            t_workload = time.perf_counter()
            usable = [r for r in readers if not (w.kind == "frames" and r in ("decord2", "torchcodec", "limit"))]
            for name, _, _ in recipes:
                for n in args.workers:
                    for reader in usable:
                        keys = [(reader, wi, name, ci, args.short_side) for ci in range(counts[wi])]
                        t0 = time.perf_counter()
                        cpu = sum(pools[n].map(_job, keys, chunksize=1))
                        results[(w.name, name, n, reader)] = counts[wi] / (time.perf_counter() - t0)
                        cpu_rates[(w.name, name, n, reader)] = counts[wi] / cpu
            if not args.no_feed and w.name in FEED_WORKLOADS:
                for name, _, _, short_side in FEED_RECIPES:
                    for n in args.workers[:1]:  # a per-core figure: one worker is enough
                        keys = [("vmm", wi, name, ci, short_side) for ci in range(counts[wi])]
                        t0 = time.perf_counter()
                        cpu = sum(pools[n].map(_job, keys, chunksize=1))
                        results[(w.name, name, n, "vmm")] = counts[wi] / (time.perf_counter() - t0)
                        cpu_rates[(w.name, name, n, "vmm")] = counts[wi] / cpu
            print(f"  timed {w.name} in {time.perf_counter() - t_workload:.0f} s", flush=True)
    finally:
        for pool in pools.values():
            pool.close()
            pool.join()
    _print_peers(workloads, recipes, args, readers, results, cpu_rates, counts)
    print(f"total {time.perf_counter() - t_start:.0f} s; load average {os.getloadavg()[0]:.1f}")
    return {"wall": results, "cpu": cpu_rates}


def _worker_init_noop(_) -> None:
    return None


def _print_peers(workloads, recipes, args, readers, results, cpu_rates, counts) -> None:
    cols = [r for r in READERS if r in readers]
    print()
    print(f"short side {args.short_side}, uint8 RGB, a reader opened per clip, decoder threads 1")
    for w, c in zip(workloads, counts, strict=True):
        print(f"  {w.name}: {w.size[0]}x{w.size[1]}, {w.num_frames} frames, {w.note}; {c} clips per cell")

    def fmt(v):
        return "—" if v is None else f"{v:.2f}" if v < 10 else f"{v:.1f}" if v < 100 else f"{v:.0f}"

    for title, table in [
        ("clips/s of the pool (wall clock; per core: divide by workers)", results),
        ("clips per CPU second of the workers (per core, robust to other load on the machine)", cpu_rates),
    ]:
        print()
        print(title)
        head = ["workload", "recipe", "workers", *cols, "vmm/decord2", "vmm/limit"]
        print("| " + " | ".join(head) + " |")
        print("|" + " --- |" * len(head))
        for w in workloads:
            for name, _, _ in recipes:
                for n in args.workers:
                    row = {r: table.get((w.name, name, n, r)) for r in cols}
                    vmm, dec, lim = row.get("vmm"), row.get("decord2"), row.get("limit")
                    ratio_dec = f"{vmm / dec:.2f}" if vmm and dec else "—"
                    ratio_lim = f"{vmm / lim:.2f}" if vmm and lim else "—"
                    cells = [w.name, name, str(n), *[fmt(row[r]) for r in cols], ratio_dec, ratio_lim]
                    print("| " + " | ".join(cells) + " |")
    feed_names = {r[0] for r in FEED_RECIPES}
    if any(k[1] in feed_names for k in cpu_rates):
        print()
        print("feed: vmm clips per CPU second (per core) at the paper recipes; pool clips/s / workers in brackets")
        print("| workload | recipe | " + " | ".join(f"{n} worker(s)" for n in args.workers[:1]) + " |")
        print("|" + " --- |" * (2 + len(args.workers[:1])))
        for wname in FEED_WORKLOADS:
            for name, *_ in FEED_RECIPES:
                cells = []
                for n in args.workers[:1]:
                    c, v = cpu_rates.get((wname, name, n, "vmm")), results.get((wname, name, n, "vmm"))
                    cells.append("—" if c is None else f"{fmt(c)} ({fmt(v / n)})")
                if any(c != "—" for c in cells):
                    print(f"| {wname} | {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
