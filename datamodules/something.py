"""Something-Something V1 and V2 (docs/data.md): the official layouts, flips that respect left/right.

V2: `root/20bn-something-something-v2/<id>.webm` and `root/labels/{labels,train,validation,test}.json`;
or frames extracted per video (`<frame_dir>/<id>/img_00001.jpg`). V1: frame folders
`root/20bn-something-something-v1/<id>/00001.jpg` and `something-something-v1-{labels,train,
validation[,test]}.csv`. The official test splits carry no labels: they serve `vmm predict` only
(`test_split="test"`); by default the test split is the validation set, where results are reported.

Left and right are part of the labels ("Pushing something from left to right"), so horizontal flips
are off by default; `flip=True` flips half of the training clips and swaps each left/right class
pair (found from the class names) of the flipped clips, so a mirrored clip keeps a true label.
"""

from __future__ import annotations

import csv
import io
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from torch.utils.data import DataLoader

from .annotations import AnnotationError, VideoRecord, read_annotation_text, read_class_names, read_json
from .base import VideoDataModule
from .frames import FrameRecord, check_template
from .sampling import Sampling

log = logging.getLogger(__name__)

__all__ = [
    "SomethingSomethingV1DataModule",
    "SomethingSomethingV2DataModule",
    "left_right_pairs",
    "mirror_class_name",
    "mirror_label_table",
]

TestSplit = Literal["validation", "test"]
ClassOrder = Literal["file", "sorted"]

_LEFT_RIGHT = re.compile(r"\b(left|right|Left|Right|LEFT|RIGHT)\b")
_SWAP = {"left": "right", "right": "left", "Left": "Right", "Right": "Left", "LEFT": "RIGHT", "RIGHT": "LEFT"}


def mirror_class_name(name: str) -> str:
    """`name` with the words left and right exchanged (what the class looks like in a mirror)."""
    return _LEFT_RIGHT.sub(lambda m: _SWAP[m.group(0)], name)


def mirror_label_table(class_names: Sequence[str]) -> list[int]:
    """class id -> id of its mirror image: the class whose name is this one with left and right
    exchanged when that class exists, else the class itself ("pulling it right out" has no partner)."""
    ids = {n: i for i, n in enumerate(class_names)}
    return [ids.get(mirror_class_name(n), i) for i, n in enumerate(class_names)]


def left_right_pairs(class_names: Sequence[str]) -> list[tuple[int, int]]:
    """The (i, j) class pairs, i < j, that a horizontal flip exchanges."""
    table = mirror_label_table(class_names)
    return [(i, j) for i, j in enumerate(table) if i < j]


def _fold(name: str) -> str:
    """Case and runs of white space do not distinguish class names."""
    return " ".join(name.split()).casefold()


def _class_lookup(names: Sequence[str]):
    exact = {n: i for i, n in enumerate(names)}
    folded = {_fold(n): i for i, n in enumerate(names)}

    def lookup(name: str) -> int | None:
        hit = exact.get(name)
        return hit if hit is not None else folded.get(_fold(name))

    return lookup


class _SomethingSomething(VideoDataModule):
    """What V1 and V2 share: flips with left/right swapping, segment sampling, the unlabelled test
    split for prediction. Subclasses implement `_class_names()` and `_entries(split)`.
    """

    def __init__(
        self,
        root: str,
        *,
        flip: bool = False,
        flip_swaps_left_right: bool = True,
        test_split: TestSplit = "validation",
        **kwargs,
    ):
        if test_split not in ("validation", "test"):
            raise ValueError(f"test_split: expected 'validation' or 'test', got {test_split!r}")
        self.flip = bool(flip)
        self.flip_swaps_left_right = bool(flip_swaps_left_right)
        # With swapping the dataset flips (it must know which clips were mirrored); else the transform.
        super().__init__(flip=self.flip and not self.flip_swaps_left_right, **kwargs)
        self.root = Path(root).expanduser()
        self.test_split = test_split

    @property
    def left_right_pairs(self) -> list[tuple[int, int]]:
        """Class pairs exchanged by a horizontal flip (from the class names)."""
        return left_right_pairs(self.class_names)

    def _train_flip_labels(self) -> list[int] | None:
        if not (self.flip and self.flip_swaps_left_right):
            return None
        return mirror_label_table(self.class_names)

    def test_dataloader(self) -> DataLoader:
        trainer = self._trainer_or_none()
        if self.test_split == "test" and trainer is not None and trainer.testing:
            raise ValueError(
                f"test_split='test': the {type(self).__name__} test split has no labels and serves "
                "`vmm predict` only; use test_split='validation' (the default) for `vmm test`"
            )
        return super().test_dataloader()


class SomethingSomethingV2DataModule(_SomethingSomething):
    """Something-Something V2 (174 classes, 168,913 train / 24,777 validation / 27,157 test videos).

    `root/<video_dir>/<id>.webm` (`video_dir` default "20bn-something-something-v2") and
    `root/<label_dir>/` (default "labels") with `labels.json` (class name -> id as a string),
    `train.json`, `validation.json` (entries with `id`, `template`, `label`, `placeholders`; the
    class is the template with its brackets removed) and `test.json` (ids only), or the same files
    under the download's names `something-something-v2-{labels,train,validation,test}.json`
    (MMAction2's and TSM's). With `frame_dir`
    (absolute or relative to `root`), clips are read from extracted frames
    `<frame_dir>/<id>/<frame_template>` numbered from `frame_start_index` instead.
    Test split: "validation" (default) or "test" (unlabelled, for `vmm predict`). Flips: see the
    module docstring. Clip/transform/loader arguments: `VideoDataModule` (here `sampling` defaults
    to "segment" and `num_frames` to 8).
    """

    def __init__(
        self,
        root: str,
        video_dir: str = "20bn-something-something-v2",
        label_dir: str = "labels",
        frame_dir: str | None = None,
        frame_template: str = "img_{:05d}.jpg",
        frame_start_index: int = 1,
        video_extension: str = ".webm",
        flip: bool = False,
        flip_swaps_left_right: bool = True,
        test_split: TestSplit = "validation",
        num_frames: int = 8,
        sampling: Sampling = "segment",
        **kwargs,
    ):
        # TSN-style segments, the usual Something-Something sampling (clips are 2-6 s long).
        super().__init__(
            root,
            flip=flip,
            flip_swaps_left_right=flip_swaps_left_right,
            test_split=test_split,
            num_frames=num_frames,
            sampling=sampling,
            **kwargs,
        )
        self.video_dir = self.root / video_dir
        self.label_dir = self.root / label_dir
        self.frame_dir = None if frame_dir is None else self.root / Path(frame_dir).expanduser()
        self.frame_template = check_template(frame_template, frame_start_index)
        self.frame_start_index = frame_start_index
        self.video_extension = video_extension

    def _label_file(self, name: str) -> Path:
        """`<label_dir>/<name>.json`, else the download's own name `something-something-v2-<name>.json`
        (kept by MMAction2 and TSM); an AnnotationError naming both when neither exists."""
        short, long = self.label_dir / f"{name}.json", self.label_dir / f"something-something-v2-{name}.json"
        if short.is_file() or not long.is_file():
            if not short.exists() and not long.exists():
                raise AnnotationError(short, None, f"annotation file not found (nor {long.name})")
            return short
        return long

    def _class_names(self) -> list[str]:
        return read_class_names(self._label_file("labels"))

    def _record(self, vid: str, label: int) -> VideoRecord:
        if self.frame_dir is not None:
            return FrameRecord(
                str(self.frame_dir / vid), label, template=self.frame_template, start_index=self.frame_start_index
            )
        return VideoRecord(str(self.video_dir / f"{vid}{self.video_extension}"), label)

    def _load_split(self, split: str) -> list[VideoRecord] | None:
        name = {"train": "train", "val": "validation", "test": self.test_split}[split]
        file = self._label_file(name)
        entries = read_json(file)
        if not isinstance(entries, list):
            raise AnnotationError(file, None, "expected a JSON list of entries")
        labelled = name != "test"
        lookup = _class_lookup(self.class_names) if labelled else None
        records = []
        for k, entry in enumerate(entries):
            if not isinstance(entry, dict) or "id" not in entry:
                raise AnnotationError(file, None, f"entry {k}: expected an object with an 'id', got {entry!r:.80}")
            if isinstance(entry["id"], bool) or not isinstance(entry["id"], str | int):
                # str() would make True a video "True" and 2.0 a video "2.0"
                raise AnnotationError(file, None, f"entry {k}: expected an 'id' string or integer, got {entry['id']!r}")
            vid = str(entry["id"]).strip()
            label = -1
            if labelled:
                template = entry.get("template")
                if not isinstance(template, str):
                    raise AnnotationError(file, None, f"entry {k} (id {vid}): expected a 'template' string")
                cls = template.replace("[", "").replace("]", "")
                found = lookup(cls)
                if found is None:
                    raise AnnotationError(
                        file,
                        None,
                        f"entry {k} (id {vid}): unknown class {cls!r} (not in {self._label_file('labels')})",
                    )
                label = found
            records.append(self._record(vid, label))
        return records


def _csv_rows(file: Path) -> list[tuple[int, list[str]]]:
    text = read_annotation_text(file)
    rows = []
    reader = csv.reader(io.StringIO(text), delimiter=";")
    for row in reader:
        if row and any(c.strip() for c in row):
            rows.append((reader.line_num, [c.strip() for c in row]))
    return rows


class SomethingSomethingV1DataModule(_SomethingSomething):
    """Something-Something V1 (174 classes, 86,017 train / 11,522 validation / 10,960 test videos),
    distributed as JPEG frames.

    Frame folders `root/<frame_dir>/<id>/<frame_template>` (default "20bn-something-something-v1"
    and "{:05d}.jpg" from 1) and, in `annotation_dir` (default `root`), the CSVs
    `something-something-v1-labels.csv` (one class name per line), `something-something-v1-train.csv`
    and `-validation.csv` (`id;label`) and `-test.csv` (ids). Class ids: `class_order="file"` (the
    default) numbers the classes in the labels file's order, as MMAction2 does; "sorted" numbers the
    sorted names, as TSM's list generator does (use it with lists or checkpoints made that way).
    Test split, flips and clip arguments: as `SomethingSomethingV2DataModule`.
    """

    def __init__(
        self,
        root: str,
        frame_dir: str = "20bn-something-something-v1",
        annotation_dir: str | None = None,
        frame_template: str = "{:05d}.jpg",
        frame_start_index: int = 1,
        flip: bool = False,
        flip_swaps_left_right: bool = True,
        test_split: TestSplit = "validation",
        class_order: ClassOrder = "file",
        num_frames: int = 8,
        sampling: Sampling = "segment",
        **kwargs,
    ):
        if class_order not in ("file", "sorted"):
            raise ValueError(f"class_order: expected 'file' or 'sorted', got {class_order!r}")
        # TSN-style segments, the usual Something-Something sampling (clips are 2-6 s long).
        super().__init__(
            root,
            flip=flip,
            flip_swaps_left_right=flip_swaps_left_right,
            test_split=test_split,
            num_frames=num_frames,
            sampling=sampling,
            **kwargs,
        )
        self.class_order = class_order
        self.frame_dir = self.root / Path(frame_dir).expanduser()
        self.annotation_dir = self.root if annotation_dir is None else self.root / Path(annotation_dir).expanduser()
        self.frame_template = check_template(frame_template, frame_start_index)
        self.frame_start_index = frame_start_index

    def _csv(self, name: str) -> Path:
        return self.annotation_dir / f"something-something-v1-{name}.csv"

    def _class_names(self) -> list[str]:
        file = self._csv("labels")
        names = [";".join(row) for _, row in _csv_rows(file)]
        if not names:
            raise AnnotationError(file, None, "no class names")
        if len(set(names)) != len(names):
            raise AnnotationError(file, None, "duplicate class names")
        return sorted(names) if self.class_order == "sorted" else names

    def _load_split(self, split: str) -> list[VideoRecord] | None:
        name = {"train": "train", "val": "validation", "test": self.test_split}[split]
        file = self._csv(name)
        labelled = name != "test"
        lookup = _class_lookup(self.class_names) if labelled else None
        records = []
        for n, row in _csv_rows(file):
            vid = row[0]
            label = -1
            if labelled:
                if len(row) < 2 or not vid:
                    raise AnnotationError(file, n, f"expected 'id;label', got {';'.join(row)!r}")
                found = lookup(";".join(row[1:]))
                if found is None:
                    raise AnnotationError(
                        file, n, f"unknown class {';'.join(row[1:])!r} (not in {self._csv('labels')})"
                    )
                label = found
            records.append(
                FrameRecord(
                    str(self.frame_dir / vid), label, template=self.frame_template, start_index=self.frame_start_index
                )
            )
        return records
