"""Real frame folders and Something-Something-like trees for the data tests, made from the shared
clips (decoded by PyAV, written as JPEG by Pillow, or re-encoded as VP9 WebM by PyAV).
"""

from __future__ import annotations

import json
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


def write_jpeg_folder(
    folder: Path, frames: list[np.ndarray], template: str = "img_{:05d}.jpg", start_index: int = 1, quality: int = 90
) -> Path:
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


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"  # tests/fixtures
# The 174 class names of Something-Something V2 as `labels/labels.json` lists them (name -> id).
SSV2_LABELS_FILE = FIXTURES / "something_something_v2_labels.json"


def ssv2_class_names() -> list[str]:
    raw = json.loads(SSV2_LABELS_FILE.read_text(encoding="utf-8"))
    return [name for name, _ in sorted(raw.items(), key=lambda kv: int(kv[1]))]


def template_of(name: str) -> str:
    """The annotation template of a class name (its `something`s in brackets, as the JSON has them)."""
    return name.replace("something", "[something]")


def source_clips(shared_videos: Path, per_clip: int = 24, size: tuple[int, int] = (64, 48)) -> list[list[np.ndarray]]:
    """Small frame sequences from each shared clip (every 2nd frame, resized to `size`)."""
    names = ("h264_340x256.mp4", "kinetics_arm_wrestling.mp4", "mpeg4_320x240.avi")
    return [read_frames(shared_videos / n, per_clip, step=2, size=size) for n in names]


def video_frames(clips: list[list[np.ndarray]], k: int, length: int = 12) -> list[np.ndarray]:
    """Frames of test video k: a window of one of the source clips (videos differ by clip and offset)."""
    src = clips[k % len(clips)]
    off = (k // len(clips)) % max(1, len(src) - length + 1)
    return src[off : off + length]


def make_ssv2_tree(
    root: Path, clips, splits: dict[str, list[str]], frames: bool = False, start: int = 0
) -> dict[str, list[str]]:
    """A Something-Something V2 tree: labels/*.json with the real 174 classes and, per split, videos
    of the given class names (webm, or frame folders `frames/<id>/img_00001.jpg` when `frames`).
    Returns the video ids per split; split "test" is written without labels."""
    labels = root / "labels"
    labels.mkdir(parents=True, exist_ok=True)
    (labels / "labels.json").write_text(SSV2_LABELS_FILE.read_text(encoding="utf-8"), encoding="utf-8")
    ids: dict[str, list[str]] = {}
    k = start
    for split, names in splits.items():
        entries = []
        for name in names:
            vid = str(1000 + k)
            if frames:
                write_jpeg_folder(root / "frames" / vid, video_frames(clips, k))
            else:
                write_webm(root / "20bn-something-something-v2" / f"{vid}.webm", video_frames(clips, k))
            entry = {"id": vid}
            if split != "test":
                entry.update(label=name.lower(), template=template_of(name), placeholders=["a thing"])
            entries.append(entry)
            ids.setdefault(split, []).append(vid)
            k += 1
        (labels / f"{split}.json").write_text(json.dumps(entries), encoding="utf-8")
    return ids


def make_ssv1_tree(root: Path, clips, class_names: list[str], splits: dict[str, list[int]]) -> dict[str, list[str]]:
    """A Something-Something V1 tree: the CSVs and frame folders `20bn-something-something-v1/<id>/00001.jpg`
    for the given class ids per split ("test": ids only)."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "something-something-v1-labels.csv").write_text("\n".join(class_names) + "\n", encoding="utf-8")
    ids: dict[str, list[str]] = {}
    for k, (split, labels) in enumerate(splits.items()):
        rows = []
        for j, label in enumerate(labels):
            vid = str(500 + 100 * k + j)
            write_jpeg_folder(
                root / "20bn-something-something-v1" / vid, video_frames(clips, 7 * k + j), template="{:05d}.jpg"
            )
            rows.append(vid if split == "test" else f"{vid};{class_names[label]}")
            ids.setdefault(split, []).append(vid)
        (root / f"something-something-v1-{split}.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    return ids
