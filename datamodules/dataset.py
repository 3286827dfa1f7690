"""Clip datasets, the batch collate function and the un-padded distributed sampler.

Every dataset item is a dict of V samples (V = 1 in training and validation, test_clips x
test_crops at test time, 0 for a video that cannot be decoded outside training):

    video  uint8 [V,3,T,H,W]   label int64 [V]   video_id int64 [V]   view int64 [V]
    bad_video_ids int64 [M]    (videos of this item that could not be decoded)

`collate_clips` concatenates items along the first dimension, giving the batches of docs/data.md §1.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.utils.data import Dataset, DistributedSampler, get_worker_info

from .annotations import VideoRecord, record_problem
from .decode import IndexCache, VideoDecodeError, VideoReader
from .frames import FrameFolderReader, FrameIndexCache, FrameRecord, open_clip_reader, record_for_path
from .sampling import Sampling, ShortVideo, eval_clip_indices, train_clip_indices
from .transforms import ClipTransform

log = logging.getLogger(__name__)

Mode = Literal["train", "val", "test"]

__all__ = [
    "ClipItems",
    "ClipSettings",
    "TooMuchBadData",
    "UnpaddedDistributedSampler",
    "VideoClipDataset",
    "VideoFilesDataset",
    "collate_clips",
]


@dataclass(frozen=True)
class ClipSettings:
    """How clips are cut from a video (shared by training, evaluation and prediction)."""

    num_frames: int = 16
    frame_interval: int = 2
    sampling: Sampling = "dense"
    short_video: ShortVideo = "loop"
    decoder_threads: int = 1

    def __post_init__(self):
        if self.num_frames < 1:
            raise ValueError(f"num_frames: expected >= 1, got {self.num_frames}")
        if self.frame_interval < 1:
            raise ValueError(f"frame_interval: expected >= 1, got {self.frame_interval}")
        if self.sampling not in ("dense", "segment"):
            raise ValueError(f"sampling: expected 'dense' or 'segment', got {self.sampling!r}")
        if self.short_video not in ("loop", "repeat_last"):
            raise ValueError(f"short_video: expected 'loop' or 'repeat_last', got {self.short_video!r}")
        if self.decoder_threads < 1:
            raise ValueError(f"decoder_threads: expected >= 1, got {self.decoder_threads}")


class TooMuchBadData(RuntimeError):
    """Raised when retries are exhausted or most of the videos tried could not be decoded."""


class ClipItems:
    """What the clip datasets share (`VideoClipDataset` over files, `sharded.ShardStream` over tar
    shards): the checked settings, the item of one video from its opened reader (`_clip_item`), the
    item of videos that could not be decoded (`_empty`), and the count of bad videos that stops a
    run on mostly unreadable data (`_count_bad`).

    mode "train": one random clip per item; mode "val": the centre clip, one view; mode "test":
    `test_clips` clips x the transform's crops. `flip_labels` (training only): flip each clip
    horizontally with probability 0.5 and map its label through this table (class -> class seen in
    the mirror: left/right pairs swapped).
    """

    def __init__(
        self,
        mode: Mode,
        clip: ClipSettings,
        transform: ClipTransform,
        test_clips: int = 1,
        max_retries: int = 10,
        max_bad_fraction: float = 0.5,
        flip_labels: Sequence[int] | None = None,
    ):
        if mode not in ("train", "val", "test"):
            raise ValueError(f"mode: expected 'train', 'val' or 'test', got {mode!r}")
        if test_clips < 1:
            raise ValueError(f"test_clips: expected >= 1, got {test_clips}")
        if max_retries < 0:
            raise ValueError(f"max_retries: expected >= 0, got {max_retries}")
        self.mode = mode
        self.clip = clip
        self.transform = transform
        self.test_clips = test_clips if mode == "test" else 1
        self.max_retries = max_retries
        self.max_bad_fraction = max_bad_fraction
        self.flip_labels = None if flip_labels is None or mode != "train" else [int(k) for k in flip_labels]
        self._tried: set[int] = set()  # distinct videos this process tried, and those that failed
        self._bad: set[int] = set()

    @property
    def views_per_video(self) -> int:
        return self.test_clips * (self.transform.num_crops if self.mode == "test" else 1)

    def sample_shape(self) -> tuple[int, int, int, int]:
        """(3, T, H, W) of a sample; H = W = 0 when crop_size is None (size depends on the video)."""
        c = self.transform.crop_size or 0
        return 3, self.clip.num_frames, c, c

    def _clip_item(
        self,
        reader: VideoReader | FrameFolderReader,
        label: int,
        video_id: int,
        rng: np.random.Generator,
        eval_mode: bool,
    ) -> dict[str, torch.Tensor]:
        # `reader` is closed once the frames are decoded. `rng` draws, in order, the clip, the
        # decode size, the transform and the flip: the same draws give the same item from any source.
        c = self.clip
        with reader:
            n = reader.index.num_frames
            if eval_mode:
                clips = eval_clip_indices(
                    n, c.num_frames, c.frame_interval, self.test_clips, sampling=c.sampling, short_video=c.short_video
                )
            else:
                clips = train_clip_indices(
                    n, c.num_frames, c.frame_interval, rng, sampling=c.sampling, short_video=c.short_video
                )[None]
            short_side = self.transform.decode_short_side(rng)
            frames = reader.decode(clips.reshape(-1), short_side=short_side)
        frames = frames.reshape(clips.shape[0], clips.shape[1], *frames.shape[1:])
        views = [v for k in range(clips.shape[0]) for v in self.transform(frames[k], rng)]
        if self.flip_labels is not None and not eval_mode and rng.random() < 0.5:
            views = [x.flip(-1) for x in views]  # [3,T,H,W]: mirror the width
            label = self.flip_labels[label]
        v = len(views)
        return {
            "video": torch.stack(views),
            "label": torch.full((v,), label, dtype=torch.int64),
            "video_id": torch.full((v,), video_id, dtype=torch.int64),
            "view": torch.arange(v, dtype=torch.int64),
            "bad_video_ids": torch.empty(0, dtype=torch.int64),
        }

    def _empty(self, bad: list[int]) -> dict[str, torch.Tensor]:
        return {
            "video": torch.empty((0, *self.sample_shape()), dtype=torch.uint8),
            "label": torch.empty(0, dtype=torch.int64),
            "video_id": torch.empty(0, dtype=torch.int64),
            "view": torch.empty(0, dtype=torch.int64),
            "bad_video_ids": torch.tensor(bad, dtype=torch.int64),
        }

    def _count_bad(self, video_id: int, exc: VideoDecodeError) -> None:
        """Count a video that failed in training; TooMuchBadData once 8 distinct videos failed in
        this process and they are more than `max_bad_fraction` of the distinct videos tried."""
        self._bad.add(video_id)
        if len(self._bad) >= 8 and len(self._bad) > self.max_bad_fraction * len(self._tried):
            raise TooMuchBadData(
                f"{len(self._bad)} of the {len(self._tried)} videos tried in this process could not be "
                f"decoded (more than max_bad_fraction={self.max_bad_fraction}); last: {exc}"
            ) from None


class VideoClipDataset(ClipItems, Dataset):
    """Clips of `records` for one split.

    mode "train": one random clip per item (random crop/flip/scale from `transform`); a video that
    cannot be decoded is logged once (path and reason) and replaced by another random video, at
    most `max_retries` times in a row; TooMuchBadData is raised when retries run out or when, once
    8 distinct videos failed in this process, more than `max_bad_fraction` of the distinct videos
    tried failed.
    mode "val": the centre clip, one view. mode "test": `test_clips` clips x the transform's crops.
    Outside training a bad video yields an item with no samples and its id in `bad_video_ids`.
    Randomness comes from (the DataLoader's per-epoch base seed, item index, attempt), so batches
    are the same for the same seed whatever the number of workers (with persistent workers, for
    the same number of workers).
    `flip_labels` (training only): flip each clip horizontally with probability 0.5 and map its
    label through this table (class -> class seen in the mirror: left/right pairs swapped).
    """

    def __init__(
        self,
        records: Sequence[VideoRecord],
        *,
        mode: Mode,
        clip: ClipSettings,
        transform: ClipTransform,
        test_clips: int = 1,
        max_retries: int = 10,
        max_bad_fraction: float = 0.5,
        index_cache_size: int = 256,
        flip_labels: Sequence[int] | None = None,
    ):
        super().__init__(mode, clip, transform, test_clips, max_retries, max_bad_fraction, flip_labels)
        self.records = list(records)
        self._cache = IndexCache(index_cache_size)
        self._frame_cache = FrameIndexCache(index_cache_size)
        # Entries found unusable when the split was listed were reported then (VideoDataModule).
        self._reported: set[str] = {r.path for r in self.records if r.problem is not None}
        self._visits: dict[int, int] = {}

    def __len__(self) -> int:
        return len(self.records)

    # -- randomness -----------------------------------------------------------------------------
    @staticmethod
    def _base_seed() -> int:
        info = get_worker_info()
        if info is not None:
            # torch gives worker k the seed base + k, base drawn once per DataLoader iterator.
            return (info.seed - info.id) % 2**64
        return int(torch.randint(0, 2**62, (1,)).item())

    def _rng(self, base: int, index: int, attempt: int, visit: int = 0) -> np.random.Generator:
        return np.random.default_rng(np.random.SeedSequence([base, index, attempt, visit]))

    # -- items ----------------------------------------------------------------------------------
    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self.records):
            raise IndexError(f"index {index} out of range for {len(self.records)} videos")
        if self.mode != "train":
            try:
                return self._load(index, self._rng(0, index, 0), eval_mode=True)
            except VideoDecodeError as exc:
                self._report(exc)
                return self._empty([index])
        base = self._base_seed()
        # Persistent workers keep their seed across epochs: the per-process visit count of this
        # index gives each epoch fresh draws (0 for workers started each epoch, the default).
        visit = self._visits.get(index, 0)
        self._visits[index] = visit + 1
        bad: list[int] = []
        current = index
        for attempt in range(self.max_retries + 1):
            rng = self._rng(base, index, attempt, visit)
            self._tried.add(current)
            try:
                item = self._load(current, rng, eval_mode=False)
                item["bad_video_ids"] = torch.tensor(bad, dtype=torch.int64)
                return item
            except VideoDecodeError as exc:
                self._report(exc)
                bad.append(current)
                self._count_bad(current, exc)
                current = int(rng.integers(0, len(self.records)))
        raise TooMuchBadData(
            f"{self.max_retries + 1} videos in a row could not be decoded while loading item {index} "
            f"(max_retries={self.max_retries}); most of the data may be unreadable. "
            f"Last: {self.records[bad[-1]].path}"
        )

    def _report(self, exc: VideoDecodeError) -> None:
        if exc.path not in self._reported:
            self._reported.add(exc.path)
            log.warning("skipping unreadable video %s: %s", exc.path, exc.reason)

    def _index(self, record: VideoRecord):
        # Checked before anything opens the path: opening a FIFO would block this worker forever.
        problem = record.problem or record_problem(record)
        if problem is not None:
            raise VideoDecodeError(record.path, problem)
        if isinstance(record, FrameRecord):
            return self._frame_cache.get(record)
        index = self._cache.get(record.path)
        if record.start is not None or record.end is not None:
            index = index.window(record.start, record.end)
            if index.num_frames == 0:
                raise VideoDecodeError(record.path, f"no frames in the window [{record.start}, {record.end}) s")
        return index

    def _load(self, vid: int, rng: np.random.Generator, eval_mode: bool) -> dict[str, torch.Tensor]:
        record = self.records[vid]
        reader = open_clip_reader(record, self._index(record), threads=self.clip.decoder_threads)
        return self._clip_item(reader, record.label, vid, rng, eval_mode)


class VideoFilesDataset(VideoClipDataset):
    """Test-time views of arbitrary video files or frame folders (template guessed from the file
    names), for prediction (label -1, video_id = position).

    Yields the same items as a DataModule's test set: `test_clips` clips x `test_crops` crops
    (1 centre or 3), decoded at short side `short_side` and cropped to `crop_size`.
    """

    def __init__(
        self,
        paths: Sequence[str],
        *,
        num_frames: int = 16,
        frame_interval: int = 2,
        test_clips: int = 1,
        test_crops: int = 1,
        short_side: int = 256,
        crop_size: int | None = 224,
        sampling: Sampling = "dense",
        short_video: ShortVideo = "loop",
        decoder_threads: int = 1,
    ):
        if isinstance(paths, str | bytes):
            raise TypeError("paths: expected a sequence of file paths, got a single string")
        super().__init__(
            [record_for_path(p) for p in paths],
            mode="test",
            clip=ClipSettings(num_frames, frame_interval, sampling, short_video, decoder_threads),
            transform=ClipTransform(
                train=False, short_side=(short_side, short_side), crop_size=crop_size, num_crops=test_crops
            ),
            test_clips=test_clips,
        )


def collate_clips(items: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Concatenate dataset items along the sample dimension (items with no samples contribute none)."""
    if len(items) == 0:
        raise ValueError("items: expected at least one dataset item")
    videos = [it["video"] for it in items if it["video"].shape[0] > 0]
    sizes = sorted({tuple(v.shape[1:]) for v in videos})
    if len(sizes) > 1:
        raise ValueError(
            f"collate_clips: the clips of one batch differ in size {sizes} ([C,T,H,W]). With crop_size: null "
            "every video keeps its own aspect ratio, so videos of different aspect ratios cannot share a "
            "batch: set crop_size (e.g. 224), or batch_size / test_batch_size to 1"
        )
    out = {"video": torch.cat(videos) if videos else items[0]["video"]}
    for key in ("label", "video_id", "view", "bad_video_ids"):
        out[key] = torch.cat([it[key] for it in items])
    return out


class UnpaddedDistributedSampler(DistributedSampler):
    """Rank r takes items r, r + world, r + 2*world, ... with no padding and no shuffling.

    The stock DistributedSampler repeats items so every rank has the same count, which counts some
    videos twice in evaluation. Ranks may then run different numbers of batches (Lightning's
    evaluation loop does not need equal counts). A DistributedSampler subclass, so Lightning does
    not replace it.
    """

    def __init__(self, dataset: Dataset, num_replicas: int | None = None, rank: int | None = None):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.num_samples = len(range(self.rank, len(self.dataset), self.num_replicas))
        self.total_size = len(self.dataset)

    def __iter__(self):
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return self.num_samples
