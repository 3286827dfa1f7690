"""Frame-folder decoding: a clip read from a directory of images (JPEG or PNG), one file per frame.

A video stored as extracted frames is a folder with files named by a template such as
`img_{:05d}.jpg` (MMAction2 / TSN), `{:05d}.jpg` (Something-Something V1) or `frame{:06d}.png`,
numbered from `start_index` (0 or 1). Frame index i of the clip samplers means the file
`template.format(start_index + i)`. Only the frames a clip asks for are opened, and JPEGs are
decoded at reduced scale when the target short side allows it (libjpeg's DCT scaling by 1/2,
1/4 or 1/8 through Pillow's `Image.draft`), then resized to the exact size.

The output and the bad-data policy are those of `datamodules.decode`: uint8 [N,H,W,3] RGB, and a
missing folder, an empty folder, a missing frame file or an unreadable image raise
`VideoDecodeError` naming the folder, which the datasets count, replace in training and report
at test (docs/data.md).
"""

from __future__ import annotations

import io
import os
import re
import string
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
from PIL import Image

from .annotations import VideoRecord
from .decode import VideoDecodeError, VideoIndex, VideoReader, output_size

__all__ = [
    "DEFAULT_TEMPLATE",
    "FrameFolderReader",
    "FrameIndex",
    "FrameIndexCache",
    "FrameRecord",
    "check_template",
    "frame_index",
    "guess_template",
    "open_clip_reader",
    "probe_frame_folder",
    "record_for_path",
]

DEFAULT_TEMPLATE = "img_{:05d}.jpg"

# Pillow's bilinear resize widens its filter when shrinking (antialiased), like the video path's
# swscale resize; after DCT scaling the remaining factor is at most 2, where bilinear is enough.
_RESAMPLE = Image.Resampling.BILINEAR
_IMAGE_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# Pillow's convert("RGB") clips these at 255 instead of scaling them.
_GREY_16 = ("I;16", "I;16L", "I;16B", "I;16N")


def _check_mode(im: Image.Image) -> None:
    """Refuse images whose bit depth `_to_rgb` cannot map to 8 bits (ValueError, a decode error)."""
    if im.mode == "F" or im.mode.startswith("I;32") or im.mode.startswith("F;"):
        raise ValueError(f"mode {im.mode} (floating-point or 32-bit) images are not supported; expected 8- or 16-bit")


def _to_rgb(im: Image.Image) -> Image.Image:
    """`im` as 8-bit RGB; 16-bit grey keeps its high byte (mode I, as older Pillow opens 16-bit
    PNGs, must hold values in [0, 65535])."""
    _check_mode(im)
    if im.mode in _GREY_16 or im.mode == "I":
        values = np.asarray(im)
        if im.mode == "I" and values.size and (values.min() < 0 or values.max() > 65535):
            raise ValueError(
                f"mode I image with values in [{values.min()}, {values.max()}]; expected 16-bit values in [0, 65535]"
            )
        return Image.fromarray((values.astype(np.uint32) >> 8).astype(np.uint8)).convert("RGB")
    return im.convert("RGB")


def check_template(template: str, start_index: int = 1) -> str:
    """Return `template` if it names frame files by one integer field (e.g. 'img_{:05d}.jpg').

    Raises ValueError naming `template` / `start_index` otherwise.
    """
    if not isinstance(template, str):
        raise ValueError(f"template: expected a str such as 'img_{{:05d}}.jpg', got {type(template).__name__}")
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
        example = template.format(start_index)
    except (ValueError, IndexError, KeyError) as exc:
        raise ValueError(
            f"template: expected a file name with one integer field such as 'img_{{:05d}}.jpg', "
            f"got {template!r} ({exc})"
        ) from None
    if len(fields) != 1 or fields[0] not in ("", "0"):
        raise ValueError(
            f"template: expected exactly one positional field such as 'img_{{:05d}}.jpg', got {template!r}"
        )
    if "/" in example or os.sep in example:
        raise ValueError(f"template: expected a file name without folders, got {template!r}")
    if start_index not in (0, 1):
        raise ValueError(f"start_index: expected 0 or 1, got {start_index}")
    return template


def _template_regex(template: str) -> re.Pattern:
    parts = []
    for literal, field, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if field is not None:
            parts.append(r"(\d+)")
    return re.compile("".join(parts) + r"\Z")


@dataclass(frozen=True)
class FrameRecord(VideoRecord):
    """A video stored as a frame folder: `path` is the folder, frames are `template` numbered from
    `start_index`, skipping the first `offset` (MMAction2's with-offset lists). `num_frames` from an
    annotation list is trusted (no folder scan); None counts the files from there. Time windows
    (`start`/`end`) do not apply to frame folders.
    """

    num_frames: int | None = None
    template: str = DEFAULT_TEMPLATE
    start_index: int = 1
    offset: int = 0


@dataclass(frozen=True)
class FrameIndex:
    """The frames of one folder: frame i (0-based, as the samplers count) is `file(i)`.

    `num_frames` is 1 + the highest frame number found minus `start_index` (or the listed count):
    a gap in the numbering shows up as a missing file when a clip asks for that frame.
    """

    path: str
    num_frames: int
    template: str = DEFAULT_TEMPLATE
    start_index: int = 1

    def file(self, i: int) -> str:
        return os.path.join(self.path, self.template.format(self.start_index + int(i)))


def frame_index(
    path: str | os.PathLike,
    template: str = DEFAULT_TEMPLATE,
    start_index: int = 1,
    num_frames: int | None = None,
    offset: int = 0,
) -> FrameIndex:
    """Index the frame folder `path` (scans it unless `num_frames` is given); frame 0 is the file
    numbered `start_index + offset`.

    Raises VideoDecodeError for a missing folder or one without a file matching `template`.
    """
    check_template(template, start_index)
    if offset < 0:
        raise ValueError(f"offset: expected >= 0, got {offset}")
    start_index += offset
    folder = str(path)
    if num_frames is not None:
        if num_frames < 1:
            raise VideoDecodeError(folder, f"the annotation lists {num_frames} frames")
        return FrameIndex(folder, int(num_frames), template, start_index)
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        raise VideoDecodeError(folder, "frame folder not found") from None
    except NotADirectoryError:
        raise VideoDecodeError(folder, "not a folder (expected a folder of frame images)") from None
    except OSError as exc:
        raise VideoDecodeError(folder, f"cannot list the frame folder: {exc}") from None
    pattern, present = _template_regex(template), set(names)
    # only names the template itself writes: 'img_1.jpg' is not frame 1 of 'img_{:05d}.jpg'
    numbers = [
        n
        for n in (int(m.group(1)) for m in map(pattern.match, names) if m is not None)
        if template.format(n) in present
    ]
    usable = [n for n in numbers if n >= start_index]
    if not usable:
        hint = " (found frame number 0: set start_index=0)" if 0 in numbers else ""
        raise VideoDecodeError(folder, f"no frame files matching {template!r} from number {start_index}{hint}")
    return FrameIndex(folder, max(usable) - start_index + 1, template, start_index)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
_NUMBERED = re.compile(r"\A(.*?)(\d+)(\.[A-Za-z]+)\Z")


def guess_template(path: str | os.PathLike) -> tuple[str, int]:
    """(template, start_index) of a frame folder from its file names: the last run of digits of the
    first image name (flow_x_* / flow_y_* names skipped when others exist) is the frame number
    ("00001.jpg" -> "{:05d}.jpg", "img_00001.jpg" -> "img_{:05d}.jpg", "frame7.png" -> "frame{:d}.png");
    start index 0 if frame 0 exists, else 1.

    Raises VideoDecodeError for a missing folder or one without numbered JPEG/PNG files.
    """
    folder = str(path)
    try:
        names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_SUFFIXES))
    except OSError as exc:
        raise VideoDecodeError(folder, f"cannot list the frame folder: {exc.strerror or exc}") from None
    matches = [m for m in map(_NUMBERED.match, names) if m is not None]
    if not matches:
        raise VideoDecodeError(folder, "no numbered JPEG/PNG frame files")
    # MMAction2 / denseflow rawframes keep the flow images (flow_x_*, flow_y_*) beside the RGB frames
    # (img_*) in one folder; they sort first but are not the video.
    rgb = [m for m in matches if not m.group(1).lower().startswith("flow")]
    match = (rgb or matches)[0]
    prefix, digits, suffix = match.groups()
    literal = prefix.replace("{", "{{").replace("}", "}}")
    field = f"{{:0{len(digits)}d}}" if digits.startswith("0") and len(digits) > 1 else "{:d}"
    template = f"{literal}{field}{suffix.replace('{', '{{').replace('}', '}}')}"
    start = 0 if template.format(0) in names else 1
    return check_template(template, start), start


class FrameIndexCache:
    """A small per-process LRU of FrameIndex objects, so repeated clips of a folder skip the scan."""

    def __init__(self, capacity: int = 512):
        self.capacity = capacity
        self._items: OrderedDict[tuple, FrameIndex] = OrderedDict()

    def get(self, record: FrameRecord) -> FrameIndex:
        key = (record.path, record.template, record.start_index, record.num_frames, record.offset)
        item = self._items.get(key)
        if item is not None:
            self._items.move_to_end(key)
            return item
        item = frame_index(record.path, record.template, record.start_index, record.num_frames, record.offset)
        if self.capacity > 0:
            self._items[key] = item
            if len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return item


class FrameFolderReader:
    """Clip decoding from a frame folder, with the interface of `VideoReader` (context manager,
    `index.num_frames`, `decode(frame_indices, short_side=...)`). Nothing is held open.
    `decode_full_scale = True` turns the reduced-scale JPEG decoding off (for comparisons).

    `images`: the frames' encoded bytes (frame i is `images[i]`; e.g. the frame members of a tar
    shard) read instead of the folder's files; `path` then only names the video in errors, and
    `index` (if given) must count `len(images)` frames. An empty `images` is an unreadable video
    (VideoDecodeError).
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        index: FrameIndex | None = None,
        template: str = DEFAULT_TEMPLATE,
        start_index: int = 1,
        images: Sequence[bytes] | None = None,
    ):
        self.path = str(path)
        self.images = None if images is None else list(images)
        if self.images is None:
            self.index = index if index is not None else frame_index(path, template, start_index)
        elif not self.images:
            raise VideoDecodeError(self.path, "no frame images")
        elif index is None:
            self.index = FrameIndex(self.path, len(self.images), template, start_index)
        elif index.num_frames != len(self.images):
            raise ValueError(f"index: counts {index.num_frames} frames, but images holds {len(self.images)}")
        else:
            self.index = index
        self.decode_full_scale = False

    def __enter__(self) -> FrameFolderReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        pass

    def decode(self, frame_indices: np.ndarray | Sequence[int], *, short_side: int | None = None) -> np.ndarray:
        """Read the frames at `frame_indices` (repeats allowed, any order; each file opened once).

        Returns uint8 [len(frame_indices), H, W, 3] RGB with the short side scaled to `short_side`
        (None: full size). The size comes from the first frame read; a frame of another size is
        resized to it. Raises VideoDecodeError for a missing or unreadable frame file.
        """
        want = np.asarray(frame_indices, dtype=np.int64)
        n = self.index.num_frames
        if want.ndim != 1 or want.size == 0:
            raise ValueError(f"frame_indices: expected a non-empty 1-D sequence, got shape {tuple(want.shape)}")
        if want.min() < 0 or want.max() >= n:
            raise ValueError(f"frame_indices: expected values in [0, {n}), got [{want.min()}, {want.max()}]")
        slots: dict[int, list[int]] = {}
        for slot, i in enumerate(want.tolist()):
            slots.setdefault(i, []).append(slot)
        out: np.ndarray | None = None
        size: tuple[int, int] | None = None
        for i in sorted(slots):
            rgb = self._read(i, short_side, size)
            if out is None:
                size = (rgb.shape[1], rgb.shape[0])
                out = np.empty((want.size, *rgb.shape), dtype=np.uint8)
            out[slots[i]] = rgb
        assert out is not None
        return out

    @contextmanager
    def _image(self, i: int) -> Iterator[Image.Image]:
        # Frame i's image, opened; a missing file or an unreadable image (also found while the
        # caller decodes it) is a VideoDecodeError naming the video and the frame.
        file = self.index.file(i) if self.images is None else io.BytesIO(self.images[i])
        name = os.path.basename(file) if self.images is None else str(i)
        try:
            with Image.open(file) as im:
                yield im
        except FileNotFoundError:
            raise VideoDecodeError(
                self.path, f"frame file missing: {name} (frame {i} of {self.index.num_frames})"
            ) from None
        except _IMAGE_ERRORS as exc:
            raise VideoDecodeError(self.path, f"unreadable frame {name}: {exc}") from None

    def _read(self, i: int, short_side: int | None, size: tuple[int, int] | None) -> np.ndarray:
        with self._image(i) as im:
            w, h = size if size is not None else output_size(im.width, im.height, short_side)
            if (w, h) != im.size and not self.decode_full_scale:
                # JPEG: decode at the smallest DCT scale (1, 1/2, 1/4, 1/8) still >= (w, h);
                # other formats ignore the request.
                im.draft("RGB", (w, h))
            rgb = _to_rgb(im)
            if rgb.size != (w, h):
                rgb = rgb.resize((w, h), _RESAMPLE)
            return np.asarray(rgb, dtype=np.uint8)

    def probe(self) -> dict:
        """Read every frame once and report what was found (the frame counterpart of
        `decode.probe_full_decode`; "duration" and "fps" are None: frames carry no timing; width
        and height are the most common frame size). Raises VideoDecodeError for a missing or
        unreadable frame."""
        sizes: dict[tuple[int, int], int] = {}
        kind = "?"
        for i in range(self.index.num_frames):
            with self._image(i) as im:
                kind = im.format or kind
                sizes[im.size] = sizes.get(im.size, 0) + 1
                # The whole entropy-coded stream is still read at 1/8 scale: truncation is found, faster.
                im.draft("RGB", (max(1, im.width // 8), max(1, im.height // 8)))
                im.load()
                _to_rgb(im)
        width, height = max(sizes, key=sizes.get)
        return {
            "frames": self.index.num_frames,
            "index_frames": self.index.num_frames,
            "duration": None,
            "fps": None,
            "width": width,
            "height": height,
            "codec": kind.lower(),
        }


def record_for_path(path: str | os.PathLike, label: int = -1) -> VideoRecord:
    """A record for a path given by a user: a FrameRecord (template guessed from the file names,
    `guess_template`) for a folder, a VideoRecord otherwise. A folder whose names give no template
    becomes a record with `problem` set (reported as unreadable, never opened)."""
    if not os.path.isdir(path):
        return VideoRecord(str(path), label)
    try:
        template, start = guess_template(path)
    except VideoDecodeError as exc:
        return FrameRecord(str(path), label, problem=exc.reason)
    return FrameRecord(str(path), label, template=template, start_index=start)


def open_clip_reader(
    record: VideoRecord, index: VideoIndex | FrameIndex, threads: int = 1
) -> VideoReader | FrameFolderReader:
    """The reader of `record`: a frame folder for a FrameRecord, PyAV otherwise."""
    if isinstance(record, FrameRecord):
        return FrameFolderReader(record.path, index=index)
    return VideoReader(record.path, threads=threads, index=index)


def probe_frame_folder(record: FrameRecord) -> dict:
    """Read every frame of a frame folder once and report what was found (`FrameFolderReader.probe`).
    Raises VideoDecodeError for a missing/empty folder or a missing/unreadable frame.
    """
    index = frame_index(record.path, record.template, record.start_index, record.num_frames, record.offset)
    return FrameFolderReader(record.path, index=index).probe()
