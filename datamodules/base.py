"""The shared LightningDataModule: clip settings, transforms, dataloaders, DDP samplers."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import lightning as L
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from .annotations import VideoRecord, check_records
from .dataset import (
    ClipSettings,
    UnpaddedDistributedSampler,
    VideoClipDataset,
    VideoFilesDataset,
    collate_clips,
)
from .sampling import Sampling, ShortVideo
from .transforms import ClipTransform, TrainCrop

log = logging.getLogger(__name__)


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one, else all)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # no sched_getaffinity (macOS, Windows)
        return os.cpu_count() or 1


_lowered_workers: set[tuple[int, int]] = set()  # (configured, used) already reported by this process


def fitted_num_workers(configured: int, report: bool = True) -> int:
    """`configured` DataLoader workers, at most one per usable CPU: more only contend for the same
    cores (and torch warns about it). Reported once per process and value when lowered."""
    used = min(configured, usable_cpus())
    if used < configured and report and (configured, used) not in _lowered_workers:
        _lowered_workers.add((configured, used))
        log.warning(f"num_workers {configured} lowered to {used}: the CPUs this process may use")
    return used


SPLITS = ("train", "val", "test")

__all__ = ["DatasetRootError", "VideoDataModule", "fitted_num_workers", "usable_cpus"]


class DatasetRootError(FileNotFoundError):
    """The dataset's `root` folder does not exist (a usage error: the wrong path was given)."""


class VideoDataModule(L.LightningDataModule):
    """Base of every layout. Subclasses implement `_class_names()` and `_load_split(split)`.

    Clip arguments: `num_frames` at `frame_interval` (dense) or one frame per segment
    (`sampling="segment"`); videos shorter than a clip "loop" or "repeat_last".
    Training transform: the decoder scales the short side to a random value in `train_short_side`
    (min, max), then a `train_crop` ("random" or "random_resized") of `crop_size`, then a flip with
    probability 0.5 when `flip`. Evaluation: short side `eval_short_side`, centre crop. Test:
    `test_clips` clips x `test_crops` (1 or 3) crops per video; a test batch holds
    `test_batch_size` videos (None: max(1, batch_size // views)), so N = videos x views.
    `decoder_threads`: FFmpeg threads per decoding worker. `max_retries` / `max_bad_fraction`:
    how many unreadable videos in a row a training item may skip, and the fraction of bad videos
    above which training stops with an error. `pin_memory=None` pins when CUDA is available.
    """

    def __init__(
        self,
        *,
        batch_size: int = 8,
        num_workers: int = 4,
        num_frames: int = 16,
        frame_interval: int = 2,
        sampling: Sampling = "dense",
        short_video: ShortVideo = "loop",
        train_short_side: tuple[int, int] = (256, 320),
        eval_short_side: int = 256,
        crop_size: int | None = 224,
        train_crop: TrainCrop = "random",
        flip: bool = True,
        test_clips: int = 10,
        test_crops: int = 3,
        test_batch_size: int | None = None,
        decoder_threads: int = 1,
        pin_memory: bool | None = None,
        persistent_workers: bool = False,
        max_retries: int = 10,
        max_bad_fraction: float = 0.5,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size: expected >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers: expected >= 0, got {num_workers}")
        if test_clips < 1:
            raise ValueError(f"test_clips: expected >= 1, got {test_clips}")
        if test_batch_size is not None and test_batch_size < 1:
            raise ValueError(f"test_batch_size: expected >= 1 or None, got {test_batch_size}")
        if not 0.0 < max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction: expected a value in (0, 1], got {max_bad_fraction}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.clip = ClipSettings(num_frames, frame_interval, sampling, short_video, decoder_threads)
        lo, hi = (train_short_side, train_short_side) if isinstance(train_short_side, int) else train_short_side
        self.train_transform = ClipTransform(
            train=True, short_side=(int(lo), int(hi)), crop_size=crop_size, crop=train_crop, flip=flip
        )
        self.val_transform = ClipTransform(
            train=False, short_side=(eval_short_side, eval_short_side), crop_size=crop_size, num_crops=1
        )
        self.test_transform = ClipTransform(
            train=False, short_side=(eval_short_side, eval_short_side), crop_size=crop_size, num_crops=test_crops
        )
        self.test_clips = test_clips
        self.test_crops = test_crops
        self.test_batch_size = test_batch_size or max(1, batch_size // (test_clips * test_crops))
        # None: pin when a CUDA device exists (pinning only helps host-to-GPU copies).
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else pin_memory
        self.persistent_workers = persistent_workers
        self.max_retries = max_retries
        self.max_bad_fraction = max_bad_fraction
        self._records: dict[str, list[VideoRecord]] = {}
        self._class_names_cache: list[str] | None = None
        self.datasets: dict[str, VideoClipDataset] = {}

    # -- what subclasses provide ----------------------------------------------------------------
    def _class_names(self) -> list[str]:
        raise NotImplementedError

    def _train_flip_labels(self) -> list[int] | None:
        """A class -> mirrored-class table when training flips must also swap labels (left/right
        classes); None (the default) leaves flipping to the transform's `flip`."""
        return None

    def _load_split(self, split: str) -> list[VideoRecord] | None:
        """Records of `split` ("train", "val", "test"); None if the layout has no such split."""
        raise NotImplementedError

    def _root_needed(self) -> bool:
        """Whether the layout reads its files under `self.root` (layouts with one), checked before
        anything is parsed; layouts whose files can all be named elsewhere override it."""
        return getattr(self, "root", None) is not None

    def _check_root(self) -> None:
        root = getattr(self, "root", None)
        if root is not None and self._root_needed() and not root.is_dir():
            what = "not a folder" if root.exists() else "no such folder"
            raise DatasetRootError(
                f"dataset root {root}: {what}; give the dataset's folder with --data.init_args.root DIR "
                "(or data.init_args.root in the config)"
            )

    # -- public ---------------------------------------------------------------------------------
    @property
    def class_names(self) -> list[str]:
        """Class names in label order (annotation files are parsed on first access)."""
        if self._class_names_cache is None:
            self._check_root()
            self._class_names_cache = list(self._class_names())
        return self._class_names_cache

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def records(self, split: str) -> list[VideoRecord]:
        """Every entry of `split`, in listed order, usable or not (`unusable(split)`); "val" falls
        back to the test list for layouts without a val split."""
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        if split not in self._records:
            recs = self._checked_split(split)
            if recs is None and split == "val":
                recs = self.records("test")
            if recs is None and split == "test":
                recs = self._checked_split("val")
            if recs is None:
                raise ValueError(f"{type(self).__name__}: this dataset has no {split!r} split")
            self._records[split] = recs
        return self._records[split]

    def unusable(self, split: str) -> list[VideoRecord]:
        """The entries of `split` that cannot be used (`record.problem` says why: listed but missing,
        a dangling link, a link loop, a FIFO, ...). They stay in the split and count as unreadable
        videos: replaced in training, excluded from (and counted in) evaluation metrics."""
        return [r for r in self.records(split) if r.problem is not None]

    def _checked_split(self, split: str) -> list[VideoRecord] | None:
        # One stat per entry, never an open (a FIFO would block); reported once, here.
        self._check_root()
        recs = self._load_split(split)
        if recs is None:
            return None
        recs = check_records(recs)
        bad = [r for r in recs if r.problem is not None]
        if bad:
            shown = "; ".join(f"{r.path} ({r.problem})" for r in bad[:5]) + ("; ..." if len(bad) > 5 else "")
            log.warning(
                "%s %r split: %d of %d entries cannot be used and count as unreadable videos "
                "(dm.unusable(%r), vmm check-data): %s",
                type(self).__name__,
                split,
                len(bad),
                len(recs),
                split,
                shown,
            )
        dups = _duplicates(recs)
        if dups:
            labels = {p: sorted({r.label for r in recs if r.path == p}) for p in dups}
            shown = "; ".join(f"{p} ({n} times, labels {labels[p]})" for p, n in list(dups.items())[:5])
            log.warning(
                "%s %r split: %d duplicate entries (a path listed more than once; each counts as a video, in "
                "training and in the metrics): %s%s",
                type(self).__name__,
                split,
                sum(dups.values()) - len(dups),
                shown,
                "; ..." if len(dups) > 5 else "",
            )
        return recs

    def duplicate_entries(self, split: str) -> dict[str, int]:
        """{path: times listed} for the paths of `split` listed more than once (warned at setup)."""
        return _duplicates(self.records(split))

    def result_notes(self, results: dict) -> list[str]:
        """Dataset-specific lines for the summary of a run (`vmm demo` prints them), given the test
        results (`top1`, `top5`, `mean_class`, `num_videos`, ...): e.g. the chance level and a
        ceiling that only this dataset has. Default: none."""
        return []

    @property
    def test_settings(self) -> dict:
        """Keyword arguments of VideoFilesDataset that build exactly this DataModule's test views."""
        c = self.clip
        return {
            "num_frames": c.num_frames,
            "frame_interval": c.frame_interval,
            "test_clips": self.test_clips,
            "test_crops": self.test_crops,
            "short_side": self.test_transform.short_side[0],
            "crop_size": self.test_transform.crop_size,
            "sampling": c.sampling,
            "short_video": c.short_video,
            "decoder_threads": c.decoder_threads,
        }

    def predict_dataset(self, paths: Sequence[str]) -> VideoFilesDataset:
        """Test-time views of arbitrary files, built like this DataModule's test set."""
        return VideoFilesDataset(paths, **self.test_settings)

    def dataset(self, split: str) -> VideoClipDataset:
        if split not in self.datasets:
            mode = split
            transform = {"train": self.train_transform, "val": self.val_transform, "test": self.test_transform}[split]
            self.datasets[split] = VideoClipDataset(
                self.records(split),
                mode=mode,
                clip=self.clip,
                transform=transform,
                test_clips=self.test_clips,
                max_retries=self.max_retries,
                max_bad_fraction=self.max_bad_fraction,
                flip_labels=self._train_flip_labels() if split == "train" else None,
            )
            if len(self.datasets[split]) == 0:
                raise ValueError(f"{type(self).__name__}: the {split!r} split has no videos")
        return self.datasets[split]

    def has_split(self, split: str) -> bool:
        """Whether `split` has a list (after the val -> test / test -> val fallbacks)."""
        try:
            self.records(split)
        except ValueError as exc:
            if "has no" in str(exc):
                return False
            raise
        return True

    def setup(self, stage: str | None = None) -> None:
        required = {"fit": ("train",), "validate": ("val",), "test": ("test",), None: ()}.get(stage, ())
        optional = {"fit": ("val",), None: SPLITS}.get(stage, ())
        for split in required:
            self.dataset(split)
        for split in optional:  # fitting without any val/test list: no validation
            if self.has_split(split):
                self.dataset(split)

    def _loader(self, dataset: VideoClipDataset, batch_size: int, shuffle: bool, sampler=None) -> DataLoader:
        trainer = self._trainer_or_none()
        workers = fitted_num_workers(self.num_workers, report=trainer is None or trainer.is_global_zero)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle if sampler is None else False,
            sampler=sampler,
            num_workers=workers,
            collate_fn=collate_clips,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
            drop_last=False,
        )

    def _eval_sampler(self, dataset: VideoClipDataset):
        world, rank = 1, 0
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.world_size > 1:
            world, rank = trainer.world_size, trainer.global_rank
        elif dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        return UnpaddedDistributedSampler(dataset, world, rank) if world > 1 else None

    def _trainer_or_none(self):
        try:
            return self.trainer
        except RuntimeError:
            return None

    def train_dataloader(self) -> DataLoader:
        # Lightning replaces the shuffling sampler by a DistributedSampler under DDP (padding is
        # harmless in training).
        return self._loader(self.dataset("train"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_split("val"):
            return []  # Lightning skips validation
        ds = self.dataset("val")
        return self._loader(ds, self.batch_size, shuffle=False, sampler=self._eval_sampler(ds))

    def test_dataloader(self) -> DataLoader:
        ds = self.dataset("test")
        return self._loader(ds, self.test_batch_size, shuffle=False, sampler=self._eval_sampler(ds))


def _duplicates(records: Sequence[VideoRecord]) -> dict[str, int]:
    """{path: count} of the paths (with the same time window) listed more than once, in listed order."""
    counts: dict[tuple, int] = {}
    for r in records:
        key = (r.path, r.start, r.end)
        counts[key] = counts.get(key, 0) + 1
    return {key[0]: n for key, n in counts.items() if n > 1}
