"""Real frame folders and Something-Something-like trees for the data tests, made from the shared
clips (decoded by PyAV, written as JPEG by Pillow, or re-encoded as VP9 WebM by PyAV).
"""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np
from PIL import Image


def read_frames(video: Path, count: int, step: int = 1, size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The first `count` frames of `video` taken every `step` frames, RGB uint8 [H,W,3] (optionally
    resized to `size` = (width, height))."""
    frames: list[np.ndarray] = []
    with av.open(str(video)) as container:
        for k, frame in enumerate(container.decode(video=0)):
            if k % step:
                continue
            img = frame.to_image()
            if size is not None:
                img = img.resize(size, Image.Resampling.BILINEAR)
            frames.append(np.asarray(img.convert("RGB")))
            if len(frames) == count:
                break
    return frames


def write_jpeg_folder(folder: Path, frames: list[np.ndarray], template: str = "img_{:05d}.jpg",
                      start_index: int = 1, quality: int = 90) -> Path:
    """Write `frames` as JPEG files named by `template` from `start_index`."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(frames):
        Image.fromarray(f).save(folder / template.format(start_index + i), quality=quality)
    return folder


def write_webm(path: Path, frames: list[np.ndarray], fps: int = 12) -> Path:
    """Encode `frames` as a VP9 WebM (the Something-Something V2 format) with PyAV."""
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = frames[0].shape[:2]
    with av.open(str(path), mode="w", format="webm") as container:
        stream = container.add_stream("libvpx-vp9", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w - w % 2, h - h % 2, "yuv420p"
        stream.options = {"deadline": "realtime", "cpu-used": "8", "crf": "30", "b:v": "0"}
        for f in frames:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: h - h % 2, : w - w % 2]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
