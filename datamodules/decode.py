"""PyAV decoding: a packet-level frame index, pts-exact seeking, and scaling inside swscale.

A video's frames are addressed by their *presentation index*: the position of the frame in the sorted
list of the video stream's packet timestamps. The list comes from demuxing the packets (no decoding),
so the index is exact for variable frame rate files and does not trust the container's frame count
or nominal rate. A clip is decoded by seeking to the last keyframe at or before the first frame it
needs and decoding forward only as far as its last frame; frames are converted to RGB (and resized)
by swscale only when the clip keeps them.
"""

from __future__ import annotations

import io
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path
from typing import BinaryIO

import av
import numpy as np
from av.video.reformatter import VideoReformatter

__all__ = [
    "IndexCache",
    "VideoDecodeError",
    "VideoReader",
    "VideoIndex",
    "build_index",
    "decode_frames",
    "output_size",
    "probe_full_decode",
]

# swscale interpolation used for the decoder-side resize; AREA is the anti-aliased choice for
# downscaling, BILINEAR costs less and is the usual choice when the scale factor is near 1.
_INTERPOLATION = "BILINEAR"


class VideoDecodeError(RuntimeError):
    """A video that cannot be used: missing, empty, unreadable, truncated, without frames or with
    a 0x0 frame size."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass(frozen=True)
class VideoIndex:
    """Presentation timestamps of every frame of a video's first video stream, and a time window.

    `all_pts` is sorted ascending, in units of `time_base` seconds; `keyframe_pts` holds the pts of
    the keyframes. The usable frames are `all_pts[lo:hi]` (the whole stream unless `window()` was
    applied); frame index i of the clip samplers means `all_pts[lo + i]`. `pts_reliable` is False for
    containers whose demuxer invents timestamps (AVI with packed B-frames): frames are then located by
    counting decoder output from a keyframe instead of by pts.
    """

    path: str
    all_pts: np.ndarray  # int64 [num_stream_frames]
    keyframe_pts: np.ndarray  # int64 [num_keyframes]
    time_base: Fraction
    width: int
    height: int
    pts_reliable: bool = True
    lo: int = 0
    hi: int | None = None

    @property
    def pts(self) -> np.ndarray:
        return self.all_pts[self.lo : self.hi]

    @property
    def num_frames(self) -> int:
        return int(self.pts.shape[0])

    @property
    def duration(self) -> float:
        """Seconds from the first to the last frame plus one mean frame interval."""
        pts = self.pts
        if pts.size < 2:
            return 0.0
        span = float((pts[-1] - pts[0]) * self.time_base)
        return span * pts.size / (pts.size - 1)

    @property
    def fps(self) -> float:
        """Mean frame rate over the usable frames (frames per second)."""
        pts = self.pts
        if pts.size < 2:
            return 0.0
        span = float((pts[-1] - pts[0]) * self.time_base)
        return (pts.size - 1) / span if span > 0 else 0.0

    def times(self, indices: np.ndarray | Sequence[int]) -> np.ndarray:
        """Presentation times (seconds from the stream's first frame) of the frames at `indices`."""
        sel = self.pts[np.asarray(indices, dtype=np.int64)]
        return (sel - self.all_pts[0]).astype(np.float64) * float(self.time_base)

    def window(self, start: float | None, end: float | None) -> VideoIndex:
        """The frames whose time (seconds from the stream's first frame) lies in [start, end)."""
        if start is None and end is None:
            return self
        t = (self.all_pts - self.all_pts[0]).astype(np.float64) * float(self.time_base)
        lo = 0 if start is None else int(np.searchsorted(t, start - 1e-6, side="left"))
        hi = t.size if end is None else int(np.searchsorted(t, end - 1e-6, side="left"))
        return replace(self, lo=lo, hi=max(lo, hi))


# Older PyAV decodes container metadata strictly unless told to ignore bad bytes; newer releases
# (19 at least) dropped the `metadata_errors` argument and raise TypeError on it.
_OPEN_KWARGS: dict = {"metadata_errors": "ignore"}


VideoSource = str | os.PathLike | bytes | bytearray | memoryview | BinaryIO
"""What a VideoReader opens: a file path, the file's bytes, or a readable binary file object."""


def _source_name(source: VideoSource) -> str:
    if isinstance(source, str | os.PathLike):
        return str(source)
    if isinstance(source, bytes | bytearray | memoryview):
        return f"<{len(source)} bytes>"
    return str(getattr(source, "name", "<file object>"))


def _open(source: VideoSource, name: str | None = None) -> av.container.InputContainer:
    """Open `source` (a path, bytes or a binary file object) with PyAV; errors name `name`."""
    global _OPEN_KWARGS
    path = name if name is not None else _source_name(source)
    if isinstance(source, str | os.PathLike):
        p = Path(source)
        if not p.exists():
            raise VideoDecodeError(path, "file not found")
        if p.stat().st_size == 0:
            raise VideoDecodeError(path, "zero-byte file")
        target = str(p)
    elif isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise VideoDecodeError(path, "zero-byte file")
        target = io.BytesIO(source)
    elif callable(getattr(source, "read", None)):
        target = source
    else:
        raise TypeError(f"source: expected a path, bytes or a binary file object, got {type(source).__name__}")
    try:
        try:
            return av.open(target, mode="r", **_OPEN_KWARGS)
        except TypeError:
            if not _OPEN_KWARGS:
                raise
            _OPEN_KWARGS = {}
            return av.open(target, mode="r")
    except (av.FFmpegError, UnicodeDecodeError, ValueError) as exc:
        raise VideoDecodeError(path, f"cannot open container: {exc}") from None


def _video_stream(container: av.container.InputContainer, path) -> av.video.stream.VideoStream:
    if not container.streams.video:
        raise VideoDecodeError(path, "no video stream")
    return container.streams.video[0]


def _configure_threads(stream: av.video.stream.VideoStream, threads: int) -> None:
    # Explicit threading: FFmpeg's default ("auto" thread count) spawns one thread per core in every
    # DataLoader worker, oversubscribing the CPU; threads=1 also keeps forked workers free of
    # decoder thread pools at exit.
    cc = stream.codec_context
    cc.thread_count = max(1, int(threads))
    cc.thread_type = "AUTO" if threads > 1 else "SLICE"


def _index_stream(container, stream, path) -> VideoIndex:
    """Demux `stream` once and build its VideoIndex; VideoDecodeError for no frames or a cut-short file."""
    pts_list, key_list, missing_pts = _demux_timestamps(container, stream, path)
    if not pts_list:
        raise VideoDecodeError(path, "no video frames")
    # The container's declared frame count is not used for indexing (it can be wrong), but far
    # fewer packets than declared means the file was cut short (a partial download).
    declared = stream.frames or 0
    if declared and len(pts_list) < declared - max(2, declared // 100):
        raise VideoDecodeError(path, f"truncated: {len(pts_list)} of the {declared} frames the container lists")
    pts = np.unique(np.asarray(pts_list, dtype=np.int64))
    keys = np.unique(np.asarray(key_list, dtype=np.int64))
    if keys.size == 0 or keys[0] > pts[0]:
        # Without a keyframe at the start, seeking to the stream start is the only safe entry.
        keys = np.concatenate([pts[:1], keys])
    tb = stream.time_base if stream.time_base is not None else Fraction(1, 1)
    # AVI stores no presentation timestamps: the demuxer derives them from packet order, which is
    # wrong for packed B-frames (decoded frames then carry swapped pts).
    reliable = not missing_pts and "avi" not in container.format.name.split(",")
    cc = stream.codec_context
    if cc.width <= 0 or cc.height <= 0:
        # A broken header (raw frames carry no size of their own): nothing to scale or decode into.
        raise VideoDecodeError(path, f"the video stream reports a {cc.width}x{cc.height} frame size")
    return VideoIndex(str(path), pts, keys, Fraction(tb), cc.width, cc.height, pts_reliable=reliable)


def _demux_timestamps(container, stream, path) -> tuple[list[int], list[int], bool]:
    """(timestamps of all packets, of the keyframe packets, whether any packet lacked a pts), in
    stream time_base units and file order. A packet without pts counts by its dts."""
    pts_list: list[int] = []
    key_list: list[int] = []
    missing_pts = False
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet PyAV yields at the end
                continue
            ts = packet.pts
            if ts is None:
                missing_pts = True
                ts = packet.dts
            if ts is None:
                continue
            pts_list.append(ts)
            if packet.is_keyframe:
                key_list.append(ts)
    except av.FFmpegError as exc:
        if not pts_list:
            raise VideoDecodeError(path, f"demuxing failed: {exc}") from None
        # A truncated tail: keep the packets read so far; decoding will confirm them.
    return pts_list, key_list, missing_pts


class VideoReader:
    """An open video: its frame index (built by demuxing unless given) and clip decoding.

    Use as a context manager (the container is always closed). `threads` is FFmpeg's decoder thread
    count for this file (set explicitly; 1 suits DataLoader workers).
    """

    def __init__(
        self, source: VideoSource, *, threads: int = 1, index: VideoIndex | None = None, name: str | None = None
    ):
        # `name` stands for the video in errors and in the index (default: the path, or a
        # description of the bytes / file object).
        self.path = name if name is not None else _source_name(source)
        self.threads = int(threads)
        self.container = _open(source, self.path)
        try:
            self.stream = _video_stream(self.container, self.path)
            _configure_threads(self.stream, self.threads)
            self.index = index if index is not None else _index_stream(self.container, self.stream, self.path)
        except BaseException:
            self.container.close()
            raise

    def __enter__(self) -> VideoReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.container.close()

    def window(self, start: float | None, end: float | None) -> VideoIndex:
        """Restrict the usable frames to times in [start, end) seconds; returns the new index."""
        self.index = self.index.window(start, end)
        return self.index

    def decode(
        self, frame_indices: np.ndarray | Sequence[int], *, short_side: int | None = None, skip_nonref: bool = True
    ) -> np.ndarray:
        """Decode the frames at indices `frame_indices` (into `index.pts`; repeats allowed, any order).

        Returns uint8 [len(frame_indices), H, W, 3] RGB, scaled by swscale so the short side is
        `short_side`. Frames are matched by pts (or by output position from a keyframe when
        `index.pts_reliable` is False), so the result is exact for variable frame rate files.
        `skip_nonref` lets the decoder drop the non-reference frames the clip does not keep (they
        cannot influence any kept frame). Raises VideoDecodeError if a frame cannot be decoded.
        """
        index = self.index
        want = np.asarray(frame_indices, dtype=np.int64)
        if want.ndim != 1 or want.size == 0:
            raise ValueError(f"frame_indices: expected a non-empty 1-D sequence, got shape {tuple(want.shape)}")
        if want.min() < 0 or want.max() >= index.num_frames:
            raise ValueError(
                f"frame_indices: expected values in [0, {index.num_frames}), got [{want.min()}, {want.max()}]"
            )
        width, height = output_size(index.width, index.height, short_side)
        out = np.empty((want.size, height, width, 3), dtype=np.uint8)
        # Positions in the full stream -> output slots, so a frame repeated in the clip is converted once.
        slots: dict[int, list[int]] = {}
        for slot, i in enumerate(want.tolist()):
            slots.setdefault(index.lo + i, []).append(slot)
        targets = np.array(sorted(slots), dtype=np.int64)
        key_pos = np.searchsorted(index.all_pts, index.keyframe_pts)  # keyframes as stream positions

        try:
            dec = _RangeDecoder(self.container, self.stream, index, slots, out, width, height)
            skip = skip_nonref and index.pts_reliable
            start = 0
            while start < targets.size:
                # A run of targets decoded in one pass: extend it while the next target's keyframe
                # is not after the previous target (decoding through is then cheaper than seeking).
                k = key_pos[max(0, int(np.searchsorted(key_pos, targets[start], side="right")) - 1)]
                stop = start + 1
                while stop < targets.size:
                    k_next = key_pos[max(0, int(np.searchsorted(key_pos, targets[stop], side="right")) - 1)]
                    if k_next > targets[stop - 1]:
                        break
                    stop += 1
                dec.run(int(k), targets[start:stop], skip)
                start = stop
            missing = [int(t) for t in targets if int(t) not in dec.done]
            if missing:
                # An open-GOP or oddly muxed file can hide a frame from a seek to its keyframe; retry
                # once from the stream start, the one entry point that always works.
                dec.run(0, np.array(missing), False)
                missing = [t for t in missing if t not in dec.done]
        except av.FFmpegError as exc:
            raise VideoDecodeError(self.path, f"decoding failed: {exc}") from None
        if missing:
            t0 = float((index.all_pts[missing[0]] - index.all_pts[0]) * index.time_base)
            raise VideoDecodeError(
                self.path, f"{len(missing)} of {targets.size} frames could not be decoded (first at {t0:.3f}s)"
            )
        return out


def build_index(source: VideoSource, *, name: str | None = None) -> VideoIndex:
    """Demux (without decoding) the first video stream's packets and index their timestamps.

    `source`: a path, the file's bytes or a binary file object (`name` names it in errors).
    Raises VideoDecodeError for a missing, zero-byte, unreadable or frame-less file.
    """
    with VideoReader(source, name=name) as reader:
        return reader.index


def output_size(width: int, height: int, short_side: int | None) -> tuple[int, int]:
    """(width, height) after scaling so the shorter side is `short_side` (None: unchanged)."""
    if short_side is None or short_side <= 0:
        return width, height
    if width <= height:
        return short_side, max(1, round(height * short_side / width))
    return max(1, round(width * short_side / height)), short_side


def decode_frames(
    index: VideoIndex,
    frame_indices: np.ndarray | Sequence[int],
    *,
    short_side: int | None = None,
    threads: int = 1,
    skip_nonref: bool = True,
) -> np.ndarray:
    """Open `index.path` and decode frames by index; see `VideoReader.decode`."""
    with VideoReader(index.path, threads=threads, index=index) as reader:
        return reader.decode(frame_indices, short_side=short_side, skip_nonref=skip_nonref)


class _RangeDecoder:
    """Seeks to a keyframe and decodes forward, converting only the frames in `slots`."""

    def __init__(self, container, stream, index: VideoIndex, slots, out, width, height):
        self.container, self.stream, self.index = container, stream, index
        # One reformatter for all frames, so swscale's context is set up once, not per frame.
        self.reformatter = VideoReformatter()
        self.slots, self.out, self.width, self.height = slots, out, width, height
        self.pos_of_pts = {int(p): i for i, p in enumerate(index.all_pts.tolist())}
        self.done: set[int] = set()

    def run(self, key: int, run: np.ndarray, skip_nonref: bool) -> None:
        """Seek to stream position `key` and decode forward until every position in `run` is stored."""
        wanted = {int(t) for t in run} - self.done
        if not wanted:
            return
        last = max(wanted)
        self._seek(key)
        try:
            for pos, frame in self._positioned(self._decoded(wanted, skip_nonref), key):
                if pos in wanted:
                    self._store(pos, frame)
                    wanted.discard(pos)
                # pos > last + 16: past any reordering delay, the frame is not in the file.
                if not wanted or pos > last + 16:
                    return
        finally:
            self.stream.codec_context.skip_frame = "DEFAULT"

    def _seek(self, key: int) -> None:
        """Seek to the keyframe at stream position `key` (0: the stream start)."""
        if key == 0:
            self.container.seek(0, backward=True, any_frame=False)  # also flushes the decoder
        else:
            self.container.seek(int(self.index.all_pts[key]), stream=self.stream, backward=True, any_frame=False)

    def _decoded(self, wanted: set[int], skip_nonref: bool):
        """Demux and decode from the current seek point, yielding frames in output order.

        `wanted` is the caller's live set of positions still missing; it is read per packet. Ends
        early, after draining the decoder, once every wanted frame's packet has been sent.
        """
        index, cc = self.index, self.stream.codec_context
        # pts of wanted frames whose packets are still to be sent (pts-reliable files only).
        unsent = {int(index.all_pts[p]) for p in wanted} if index.pts_reliable else None
        for packet in self.container.demux(self.stream):
            if skip_nonref:
                # A non-reference frame the clip does not keep cannot influence any kept frame:
                # the decoder may drop it (FFmpeg reads skip_frame per packet).
                ts = packet.pts
                keep = ts is None or not packet.size or self.pos_of_pts.get(ts, -1) in wanted
                cc.skip_frame = "DEFAULT" if keep else "NONREF"
            yield from packet.decode()
            if unsent is not None and packet.pts in unsent:
                unsent.discard(packet.pts)
                if not unsent:
                    # Every wanted frame has been sent (and with it every frame it references):
                    # drain the decoder instead of decoding the frames that follow; whatever is
                    # still missing after that is not in the file.
                    yield from cc.decode(None)
                    return

    def _positioned(self, frames, key: int):
        """Pair decoded frames with their stream positions, dropping frames with no position."""
        if self.index.pts_reliable:
            for frame in frames:
                pos = self.pos_of_pts.get(frame.pts if frame.pts is not None else -(2**62))
                if pos is not None:
                    yield pos, frame
            return
        # pts cannot be trusted: count output positions from the first keyframe out of the decoder,
        # which after a seek is the keyframe we seeked to (closed GOP).
        counter: int | None = None
        for frame in frames:
            if counter is None:
                counter = self.pos_of_pts.get(frame.pts, key) if frame.key_frame else None
                if counter is None:
                    continue
            yield counter, frame
            counter += 1

    def _store(self, pos: int, frame) -> None:
        """Convert `frame` to RGB at the output size and write it to every slot that shows `pos`."""
        rgb = self.reformatter.reformat(
            frame, width=self.width, height=self.height, format="rgb24", interpolation=_INTERPOLATION
        ).to_ndarray()
        for slot in self.slots[pos]:
            self.out[slot] = rgb
        self.done.add(pos)


def probe_full_decode(path: str | os.PathLike, threads: int = 1) -> dict:
    """Decode every frame of the first video stream once (no conversion) and report what was found.

    Returns {"frames", "duration", "fps", "width", "height", "codec", "index_frames"}; raises
    VideoDecodeError when the file cannot be opened, has no frames, or decoding fails part way.
    """
    index = build_index(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        _configure_threads(stream, threads)
        n = 0
        try:
            for frame in container.decode(stream):
                del frame
                n += 1
        except av.FFmpegError as exc:
            raise VideoDecodeError(path, f"decoding failed after {n} frames: {exc}") from None
        codec = stream.codec_context.name
    finally:
        container.close()
    if n == 0:
        raise VideoDecodeError(path, "no frame could be decoded")
    if n < index.num_frames:
        raise VideoDecodeError(path, f"only {n} of {index.num_frames} indexed frames decode (truncated?)")
    return {
        "frames": n,
        "index_frames": index.num_frames,
        "duration": index.duration,
        "fps": index.fps,
        "width": index.width,
        "height": index.height,
        "codec": codec,
    }


class IndexCache:
    """A small per-process LRU of VideoIndex objects, so repeated clips of a video skip the demux."""

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._items: OrderedDict[str, VideoIndex] = OrderedDict()

    def get(self, path: str) -> VideoIndex:
        item = self._items.get(path)
        if item is not None:
            self._items.move_to_end(path)
            return item
        item = build_index(path)
        if self.capacity > 0:
            self._items[path] = item
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return item
