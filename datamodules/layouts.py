"""The dataset layouts: folders, `path label` lists, Kinetics CSVs, HMDB-51 and UCF-101 splits.

Every class takes the clip/transform/loader keyword arguments of `VideoDataModule` as well.
"""

from __future__ import annotations

import logging
from pathlib import Path

from .annotations import (
    AnnotationError,
    VideoRecord,
    index_video_files,
    parse_folder,
    parse_hmdb51,
    parse_kinetics_csv,
    parse_path_label_list,
    parse_ucf101,
    read_class_names,
)
from .base import VideoDataModule

log = logging.getLogger(__name__)

__all__ = [
    "HMDB51DataModule",
    "KineticsDataModule",
    "UCF101DataModule",
    "VideoFolderDataModule",
    "VideoListDataModule",
]


class VideoFolderDataModule(VideoDataModule):
    """`root/{train,val,test}/<class>/<video>`; class ids = sorted class-folder names of `train/`
    (or of the first split folder present), unless `class_names` are given. Without `val/`,
    validation uses `test/`.
    """

    def __init__(self, root: str, class_names: list[str] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self._given_names = class_names

    def _split_dir(self, split: str) -> Path | None:
        d = self.root / split
        if split == "val" and not d.is_dir() and (self.root / "validate").is_dir():
            d = self.root / "validate"
        return d if d.is_dir() else None

    def _class_names(self) -> list[str]:
        if self._given_names is not None:
            return list(self._given_names)
        for split in ("train", "val", "test"):
            d = self._split_dir(split)
            if d is not None:
                return sorted(p.name for p in d.iterdir() if p.is_dir())
        raise AnnotationError(self.root, None, "expected split folders train/, val/ or test/")

    def _load_split(self, split: str) -> list[VideoRecord] | None:
        d = self._split_dir(split)
        if d is None:
            return None
        return parse_folder(d, self.class_names)[0]


def resolve_list_path(file: str | None, root: Path) -> Path | None:
    """A list/annotation file as given (absolute, or relative to the working directory), else
    relative to `root` when only that exists; None stays None."""
    if file is None:
        return None
    p = Path(file).expanduser()
    if not p.is_absolute() and not p.exists() and (root / p).exists():
        p = root / p
    return p


class VideoListDataModule(VideoDataModule):
    """`path label` list files (MMAction2 / PySlowFast style, 0-based labels), paths relative to
    `root`; list paths absolute, relative to the working directory, or relative to `root`.
    Class names: `class_names` (a list, or a file with one name per line), else "0".."K-1" with
    K = `num_classes` or 1 + the largest training label. Without `val_list`, validation uses
    `test_list`.
    """

    def __init__(
        self,
        root: str,
        train_list: str | None = None,
        test_list: str | None = None,
        val_list: str | None = None,
        class_names: list[str] | str | None = None,
        num_classes: int | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.lists = {
            "train": resolve_list_path(train_list, self.root),
            "val": resolve_list_path(val_list, self.root),
            "test": resolve_list_path(test_list, self.root),
        }
        if all(v is None for v in self.lists.values()):
            raise ValueError("train_list/val_list/test_list: expected at least one list file")
        self._given_names = class_names
        self._given_num = num_classes

    def _class_names(self) -> list[str]:
        if isinstance(self._given_names, str):
            return read_class_names(resolve_list_path(self._given_names, self.root))
        if self._given_names is not None:
            return list(self._given_names)
        k = self._given_num
        if k is None:
            first = next(s for s in ("train", "val", "test") if self.lists[s] is not None)
            labels = [r.label for r in self._parse(self.lists[first], None)]
            if not labels:
                raise AnnotationError(self.lists[first], None, "no entries listed; cannot infer num_classes")
            k = max(labels) + 1
        return [str(i) for i in range(k)]

    def _root_needed(self) -> bool:
        return False  # lists may name absolute paths; a missing list is reported by name

    def _load_split(self, split: str) -> list[VideoRecord] | None:
        file = self.lists[split]
        if file is None:
            return None
        return self._parse(file, self.num_classes)

    def _parse(self, file: Path, num_classes: int | None) -> list[VideoRecord]:
        """One list file -> records; subclasses with another line format override this."""
        return parse_path_label_list(file, self.root, num_classes)


class KineticsDataModule(VideoDataModule):
    """Kinetics: official CSVs (`label,youtube_id,time_start,time_end,split[,...]`) in
    `annotation_dir` (default `root/annotations`), videos anywhere under `video_dir` (default
    `root`), trimmed (`{id}_{start:06d}_{end:06d}.mp4`, class folders or flat) or untrimmed
    (`{id}.mp4`, the [time_start, time_end) window is used). Class ids: sorted training labels.
    Listed videos missing on disk stay in the split as unusable entries (`unusable(split)`,
    reported at setup, counted as excluded in test reports); their names are in
    `missing_videos[split]`. Validation CSV: `val_csv`, else `validate.csv`/`val.csv`; without
    one, validation uses the test CSV. A test CSV without a `label` column (the official one) is an
    unlabelled split: `vmm predict` only (test and validation on it are refused).
    """

    def __init__(
        self,
        root: str,
        annotation_dir: str | None = None,
        video_dir: str | None = None,
        train_csv: str = "train.csv",
        val_csv: str | None = None,
        test_csv: str = "test.csv",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        self.annotation_dir = Path(annotation_dir).expanduser() if annotation_dir else self.root / "annotations"
        self.video_dir = Path(video_dir).expanduser() if video_dir else self.root
        self.csv_names = {"train": train_csv, "val": val_csv, "test": test_csv}
        self._reads_root = not (annotation_dir and video_dir)
        self.missing_videos: dict[str, list[str]] = {}
        self._files: dict[str, str] | None = None

    def _root_needed(self) -> bool:
        return self._reads_root

    def _csv(self, split: str) -> Path | None:
        name = self.csv_names[split]
        candidates = [name] if name else ["validate.csv", "val.csv"]
        for c in candidates:
            p = resolve_list_path(c, self.annotation_dir)
            if not p.is_file():
                p = self.annotation_dir / c
            if p.is_file():
                return p
        if name and split == "train":
            raise AnnotationError(self.annotation_dir / name, None, "annotation file not found")
        return None

    def _class_names(self) -> list[str]:
        _, labels, _ = parse_kinetics_csv(self._csv("train"), {}, None)
        if not labels:
            raise AnnotationError(self._csv("train"), None, "no rows; cannot define the classes")
        return sorted(set(labels))

    def _load_split(self, split: str) -> list[VideoRecord] | None:
        csv_file = self._csv(split)
        if csv_file is None:
            return None
        if self._files is None:
            self._files = index_video_files(self.video_dir)
        ids = {n: i for i, n in enumerate(self.class_names)}
        # The official test CSV has no label column: an unlabelled split, for `vmm predict` only.
        records, _, missing = parse_kinetics_csv(
            csv_file, self._files, ids, self.video_dir, unlabelled_ok=split == "test"
        )
        self.missing_videos[split] = missing  # reported with the other unusable entries at setup
        return records

    def _unlabelled(self, split: str) -> bool:
        records = self.records(split)
        return bool(records) and all(r.label < 0 for r in records)

    def val_dataloader(self):
        if self._unlabelled("val"):
            raise ValueError(
                f"KineticsDataModule: no labelled validation split: without a validation CSV, validation uses "
                f"{self._csv('test')}, which has no label column; give val_csv (e.g. --data.init_args.val_csv "
                "validate.csv)"
            )
        return super().val_dataloader()

    def test_dataloader(self):
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.testing and self._unlabelled("test"):
            raise ValueError(
                f"{self._csv('test')} has no label column: the test split is unlabelled and serves vmm predict "
                "only; to test, give a labelled CSV (e.g. --data.init_args.test_csv validate.csv)"
            )
        return super().test_dataloader()


class HMDB51DataModule(VideoDataModule):
    """HMDB-51: videos in `root/<class>/<video>.avi`, split files `<class>_test_split{split}.txt`
    in `annotation_dir` (default `root/testTrainMulti_7030_splits`); flag 1 = train, 2 = test,
    0 = unused. Class ids: sorted class names. Validation uses the test split.
    """

    def __init__(self, root: str, annotation_dir: str | None = None, split: int = 1, **kwargs):
        super().__init__(**kwargs)
        if split not in (1, 2, 3):
            raise ValueError(f"split: expected 1, 2 or 3, got {split}")
        self.root = Path(root).expanduser()
        self.annotation_dir = (
            Path(annotation_dir).expanduser() if annotation_dir else self.root / "testTrainMulti_7030_splits"
        )
        self.split = split
        self._parsed: tuple[dict[str, list[VideoRecord]], list[str]] | None = None

    def _parse(self):
        if self._parsed is None:
            self._parsed = parse_hmdb51(self.annotation_dir, self.root, self.split)
        return self._parsed

    def _class_names(self) -> list[str]:
        return self._parse()[1]

    def _load_split(self, split: str) -> list[VideoRecord] | None:
        return self._parse()[0].get(split)


class UCF101DataModule(VideoDataModule):
    """UCF-101: videos in `root/<Class>/v_*.avi`, lists in `annotation_dir` (default
    `root/ucfTrainTestlist`): `classInd.txt` (1-based ids), `trainlist0{split}.txt`,
    `testlist0{split}.txt`. Validation uses the test list.
    """

    def __init__(self, root: str, annotation_dir: str | None = None, split: int = 1, **kwargs):
        super().__init__(**kwargs)
        if split not in (1, 2, 3):
            raise ValueError(f"split: expected 1, 2 or 3, got {split}")
        self.root = Path(root).expanduser()
        self.annotation_dir = Path(annotation_dir).expanduser() if annotation_dir else self.root / "ucfTrainTestlist"
        self.split = split
        self._parsed: tuple[dict[str, list[VideoRecord]], list[str]] | None = None

    def _parse(self):
        if self._parsed is None:
            self._parsed = parse_ucf101(self.annotation_dir, self.root, self.split)
        return self._parsed

    def _class_names(self) -> list[str]:
        return read_class_names(self.annotation_dir / "classInd.txt")

    def _load_split(self, split: str) -> list[VideoRecord] | None:
        return self._parse()[0].get(split)
