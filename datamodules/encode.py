"""PyAV encoding: writing uint8 RGB frames to a video file, and picking an H.264 encoder that works.

The writer behind the synthetic dataset (`datamodules.synthetic`), the prepared-dataset re-encoder
(`datamodules.prepare`) and the tests' video files. Encoding runs on one thread and, for x264, without
its AVX-512 code (`x264_cpu_flags`), so the same frames and settings give the same stream on every run.
"""

from __future__ import annotations

import functools
import logging
import os
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

log = logging.getLogger(__name__)

# In order of preference: libx264 ships in PyAV's PyPI wheels; the others appear in system FFmpeg builds.
H264_ENCODERS = ("libx264", "libopenh264", "h264")

__all__ = ["H264_ENCODERS", "pick_encoder", "write_video", "x264_asm_option", "x264_cpu_flags"]


def pick_encoder(preferred: tuple[str, ...] = H264_ENCODERS) -> str:
    """The first H.264 encoder of this PyAV build that encodes a test frame; else "mpeg4" (with a
    warning); RuntimeError if neither works."""
    tried = []
    for name in (*preferred, "mpeg4"):
        try:
            with tempfile.TemporaryDirectory() as tmp:
                write_video(Path(tmp) / "probe.mp4", np.zeros((2, 16, 16, 3), np.uint8), fps=10, encoder=name, crf=23)
        except Exception as exc:  # an encoder listed by FFmpeg may still fail to open (hardware, licence)
            tried.append(f"{name}: {type(exc).__name__}: {exc}")
            continue
        if name == "mpeg4":
            log.warning("no working H.264 encoder in this PyAV build (%s); using mpeg4", "; ".join(tried))
        return name
    raise RuntimeError(
        "cannot encode video: no H.264 (libx264, libopenh264) or mpeg4 encoder works in "
        f"this PyAV build ({'; '.join(tried)}). Install the PyAV wheel from PyPI (it bundles libx264)."
    )


def write_video(
    path: str | os.PathLike,
    frames: np.ndarray,
    *,
    fps: int = 25,
    pts_ms: np.ndarray | None = None,
    encoder: str = "libx264",
    crf: int = 12,
    lossless: bool = False,
    gop: int | None = None,
    b_frames: int | None = None,
) -> None:
    """Encode uint8 RGB frames [T,H,W,3] (H, W even) to `path` with PyAV.

    `pts_ms`: presentation times in milliseconds for a variable frame rate file (default: 1/fps
    steps). `lossless`: libx264rgb with qp 0, so decoded frames equal `frames` exactly. `gop` /
    `b_frames`: keyframe interval and B-frame count (encoder defaults when None).
    """
    frames = np.asarray(frames)
    _check_video_input(frames, pts_ms)
    name = "libx264rgb" if lossless else encoder
    with av.open(str(path), mode="w") as out:
        stream = out.add_stream(name, rate=Fraction(fps, 1))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "rgb24" if lossless else "yuv420p"
        cc = stream.codec_context
        cc.thread_count = 1
        if pts_ms is not None:
            cc.time_base = Fraction(1, 1000)
        if gop is not None:
            cc.gop_size = gop
        if b_frames is not None:
            cc.max_b_frames = b_frames
        options = _encoder_options(name, lossless, crf)
        if options is not None:
            stream.options = options
        for k, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = int(pts_ms[k]) if pts_ms is not None else k
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)


def _check_video_input(frames: np.ndarray, pts_ms: np.ndarray | None) -> None:
    """ValueError unless `frames` is uint8 [T,H,W,3] with even H, W and `pts_ms` (if given) is one
    strictly increasing time per frame."""
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames: expected uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    if frames.shape[1] % 2 or frames.shape[2] % 2:
        raise ValueError(f"frames: expected even height and width, got {frames.shape[1]}x{frames.shape[2]}")
    if pts_ms is not None and (len(pts_ms) != len(frames) or np.any(np.diff(pts_ms) <= 0)):
        raise ValueError("pts_ms: expected one strictly increasing time (ms) per frame")


def _encoder_options(name: str, lossless: bool, crf: int) -> dict[str, str] | None:
    """FFmpeg options for encoder `name` (None: the encoder's defaults)."""
    if lossless:
        return {"qp": "0", "preset": "veryfast", **x264_asm_option()}
    if name == "libx264":
        return {"crf": str(crf), "preset": "veryfast", **x264_asm_option()}
    if name == "mpeg4":
        return {"qscale": "2"}
    return None


# /proc/cpuinfo flag -> x264's name for the instruction set (each a superset of those before it).
_X264_CPU_NAMES = (
    ("sse2", "SSE2"),
    ("sse2", "SSE2Fast"),
    ("pni", "SSE3"),
    ("ssse3", "SSSE3"),
    ("sse4_1", "SSE4"),
    ("sse4_2", "SSE4.2"),
    ("avx", "AVX"),
    ("fma", "FMA3"),
    ("bmi1", "BMI1"),
    ("bmi2", "BMI2"),
    ("avx2", "AVX2"),
    ("abm", "LZCNT"),
)


@functools.cache
def x264_cpu_flags() -> str | None:
    """x264's `asm` setting: on an x86 CPU with AVX-512, every instruction set it has except
    AVX-512; None elsewhere (x264's own detection).

    Why: x264's AVX-512 code gave a different stream from run to run for the same frames and
    settings (an Intel Xeon VM; never with AVX2 or plain C), so neither cached datasets nor
    prepared shards were reproducible; AVX2 encodes as fast there.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            line = next((ln for ln in fh if ln.startswith("flags")), "")
    except OSError:
        return None
    flags = set(line.partition(":")[2].split())
    if "avx512f" not in flags:
        return None
    names = ["MMX2", "SSE"] + [name for flag, name in _X264_CPU_NAMES if flag in flags]
    return ",".join(dict.fromkeys(names)) + ",Cache64"


def x264_asm_option() -> dict[str, str]:
    """The FFmpeg option that applies `x264_cpu_flags` to a libx264 / libx264rgb stream ({} where
    x264's own detection is kept)."""
    cpu = x264_cpu_flags()
    return {} if cpu is None else {"x264-params": f"asm={cpu}"}
