"""Prediction on files a user names: expanding directories, and a datamodule without splits.

`expand_video_paths` turns the paths given to `vmm predict` into videos: a file stays as given, a
folder that holds only images (JPEG/PNG) is one video stored as frames (docs/data.md), and any
other folder is searched recursively for video files (by extension, `VIDEO_EXTENSIONS`) and
frame folders. `PredictFilesDataModule` carries a model's class names and test-view settings
(read from its checkpoint by the CLI) so files are decoded the way the model was tested.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from .annotations import VIDEO_EXTENSIONS, VideoRecord
from .base import VideoDataModule
from .frames import IMAGE_SUFFIXES

__all__ = ["PredictFilesDataModule", "expand_video_paths", "is_frame_folder"]


def is_frame_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a folder of frame images: at least one entry, and every entry a JPEG/PNG
    file (hidden files such as .DS_Store ignored)."""
    try:
        entries = [e for e in os.scandir(path) if not e.name.startswith(".")]
    except OSError:
        return False
    return bool(entries) and all(e.is_file() and e.name.lower().endswith(IMAGE_SUFFIXES) for e in entries)


def expand_video_paths(paths: Sequence[str | os.PathLike]) -> list[str]:
    """The videos named by `paths`, in the given order: files as given (any name: PyAV decides what
    it can decode), frame folders as one video each, other folders replaced by the video files and
    frame folders found under them (recursively, sorted by path).

    Raises ValueError naming `videos` when a path does not exist or a folder holds no video.
    """
    if isinstance(paths, str | bytes):
        raise TypeError("videos: expected a sequence of paths, got a single string")
    missing = [str(p) for p in paths if not os.path.exists(p)]
    if missing:
        raise ValueError(f"videos must be existing files or folders; not found: {missing}")
    out: list[str] = []
    for p in map(str, paths):
        if not os.path.isdir(p) or is_frame_folder(p):
            out.append(p)
            continue
        found = _videos_under(p)
        if not found:
            raise ValueError(
                f"videos: the folder {p!r} holds no video file ({', '.join(VIDEO_EXTENSIONS)}) and no frame "
                "folder (a folder of JPEG/PNG images only)"
            )
        out.extend(found)
    return out


def _videos_under(folder: str) -> list[str]:
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        dirnames.sort()
        frame_dirs = [d for d in dirnames if is_frame_folder(os.path.join(dirpath, d))]
        found += [os.path.join(dirpath, d) for d in frame_dirs]
        dirnames[:] = [d for d in dirnames if d not in frame_dirs]  # a frame folder is one video
        found += [os.path.join(dirpath, f) for f in filenames if os.path.splitext(f)[1].lower() in VIDEO_EXTENSIONS]
    return sorted(found)


class PredictFilesDataModule(VideoDataModule):
    """A datamodule without splits: `class_names` in the model's output order and the test-view
    settings (`num_frames`, `frame_interval`, `eval_short_side`, `crop_size`, `test_clips`,
    `test_crops`, ...; see VideoDataModule), for `predict_dataset(paths)` on any files.

    `vmm predict --ckpt_path CKPT <videos>` builds it from the checkpoint; every setting can be
    overridden as `--data.init_args.<name>`. `test_batch_size`: videos per prediction batch.
    """

    def __init__(self, class_names: list[str], **kwargs) -> None:
        super().__init__(**kwargs)
        if not class_names or not all(isinstance(n, str) for n in class_names):
            raise ValueError(f"class_names: expected a non-empty list of class names, got {class_names!r}")
        self._given_names = list(class_names)

    def _class_names(self) -> list[str]:
        return self._given_names

    def _load_split(self, split: str) -> list[VideoRecord] | None:
        return None  # files only: no train/val/test lists
