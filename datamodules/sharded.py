"""Videos streamed from WebDataset-style tar shards (`vmm prepare --format shards`), local or remote.

Layout under `root` (docs/scale.md): `meta.json` and `<split>/shard-%06d.tar`; a shard holds, per
sample, `<key>.json` and either `<key>.<ext>` (the video) or `<key>.f%06d.<ext>` (frames), key =
the sample's 0-based index in its split (`%09d`). `root` is a folder, an `http://` / `https://`
URL prefix, another URL scheme that `webdataset.gopen` opens (`gs://`, `ais://`, `hf://`, ...), or
a `pipe:` command in which `{}` stands for the path under the root
(`pipe:aws s3 cp s3://bucket/k400/{} -`). Reading a URL or pipe needs the `webdataset` package
(the `[shards]` extra); `meta.json` over http(s) is read with urllib.

Order and shares (training). Epoch e of a run with seed s permutes the split's shards with
(s, e) and lines their samples up in that order: N samples. With W ranks, rank r takes positions
[r*n, (r+1)*n) of that sequence, n = N // W (the N mod W samples at the end of the sequence are
left out this epoch; the permutation changes every epoch, so no sample is left out
systematically). A rank's n samples form ceil(n / batch_size) batches; DataLoader worker w of K
takes a contiguous run of them (floor(w*B/K) to floor((w+1)*B/K), B batches). Each worker opens
only the shards overlapping its positions, skips the members before its first sample without
reading them into memory, and shuffles its samples through a bounded buffer (`shuffle_buffer`
samples, seeded from (seed, epoch, rank, worker)). Every rank runs the same, exact number of
batches (`len(train_dataloader())`).

Evaluation (validation and test): rank r takes the keys [floor(r*N/W), floor((r+1)*N/W)) in key
order, split among its workers the same way; every video is seen exactly once with all its views,
and test results are gathered by video id (= key) as for the file datamodules.

Bad data. A member that does not decode is a bad video as in `VideoClipDataset`: logged once,
its key in the batch's `bad_video_ids`; in training it is replaced by the next sample of the
worker's stream (at most `max_retries` in a row; TooMuchBadData past `max_bad_fraction`), outside
training its item has no samples. A shard cut short (truncated, or a transfer that fails part way)
or one that cannot be opened keeps the samples read before the cut; the rest of the shard counts as
missing (a warning names the shard and the count) and is handled like bad videos, so the number of
batches stays the one Lightning was told: a training worker whose share came up short reads on
past its end, in the epoch's order (wrapping around), for replacements.
`vmm check-data` (datamodules.check) decodes every sample of the checked splits from its shard
(`probe_shard`) and counts the bad and missing ones per split.

Mid-epoch resume. The training position is (epoch, batches done, and for each DataLoader worker
its batches done and the samples taken from its shuffle buffer). It is saved in every checkpoint
(`interrupted.ckpt` of a SIGTERM, `every_n_train_steps` checkpoints) twice: as the datamodule's
state, which Lightning restores before anything makes the training iterator (an LR schedule's
`estimated_stepping_batches` makes it before Lightning restores its loops), and as the training
dataloader's (`ShardLoader.state_dict()`, for a Lightning loop that restores it itself). On
restore each worker replays its buffer draws without decoding and continues where it stopped: the
epoch ends with every sample of the share used once, in a different interleaving of the workers'
batches. A position saved at an epoch's end starts the next epoch. The position is valid for the
same world size, number of workers, batch size, seed, shuffle buffer and data; otherwise a
warning says so and the epoch's order starts over (samples of that epoch may repeat). Under DDP
the checkpoint holds rank 0's position and every rank resumes its own share with it: exact when
the ranks met no bad or missing sample in that epoch (a bad sample costs its rank one extra draw).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tarfile
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .annotations import VideoRecord
from .base import SPLITS, VideoDataModule, fitted_num_workers
from .dataset import ClipItems, ClipSettings, TooMuchBadData, collate_clips
from .decode import VideoDecodeError, VideoReader, probe_full_decode
from .frames import FrameFolderReader
from .prepare import FORMAT, FORMAT_VERSION, check_meta
from .transforms import ClipTransform

log = logging.getLogger(__name__)

# The format the packer writes, named by the packer.
SHARD_FORMAT, SHARD_FORMAT_VERSION = FORMAT, FORMAT_VERSION

__all__ = [
    "SHARD_FORMAT",
    "SHARD_FORMAT_VERSION",
    "ShardFormatError",
    "ShardLoader",
    "ShardStream",
    "ShardedVideoDataModule",
    "probe_shard",
    "read_shard_meta",
    "shard_location",
]


class ShardFormatError(ValueError):
    """`meta.json` is missing, unreadable or not a vmm shard set this reader understands."""


def _webdataset():
    try:
        import webdataset
    except ImportError:
        raise ImportError(
            "ShardedVideoDataModule needs the webdataset package to read tar shards: "
            "pip install -e '.[shards]' in a vmm checkout, or pip install webdataset"
        ) from None
    return webdataset


def _is_remote(root: str) -> bool:
    return root.startswith("pipe:") or "://" in root


def shard_location(root: str, relative: str) -> str:
    """Where `relative` (e.g. "train/shard-000000.tar") lies under `root`: a local path, a URL, or
    a `pipe:` command with `{}` replaced by `relative`."""
    if root.startswith("pipe:"):
        if "{}" not in root:
            raise ValueError(
                f"root: a pipe: root must contain {{}} where the path under it goes, e.g. "
                f"'pipe:aws s3 cp s3://bucket/prefix/{{}} -'; got {root!r}"
            )
        return root.replace("{}", relative)
    if "://" in root:
        return root.rstrip("/") + "/" + relative
    return str(Path(root).expanduser() / relative)


def _read_bytes(location: str, timeout: float) -> bytes:
    if location.startswith(("http://", "https://")):
        with urllib.request.urlopen(location, timeout=timeout) as response:  # noqa: S310 (the user's URL)
            return response.read()
    if _is_remote(location):
        stream = _webdataset().gopen(location, "rb")
        try:
            return stream.read()
        finally:
            stream.close()
    return Path(location).read_bytes()


def read_shard_meta(root: str, timeout: float = 60.0) -> dict:
    """`root`'s meta.json, checked to be a vmm shard set (`prepare.check_meta`, layout "shards")."""
    location = shard_location(root, "meta.json")
    try:
        meta = json.loads(_read_bytes(location, timeout).decode("utf-8"))
    except FileNotFoundError:
        raise ShardFormatError(
            f"root: {location} not found; expected the output folder (or URL prefix) of `vmm prepare --format shards`"
        ) from None
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise ShardFormatError(f"root: cannot read {location}: {exc}") from None
    return check_meta(meta, f"root: {location}", layout="shards", error=ShardFormatError)


# -- reading shards ---------------------------------------------------------------------------------


@dataclass
class _Sample:
    """One sample read from a shard: its key, its json, and its members' bytes by suffix."""

    key: int
    members: dict[str, bytes] = field(default_factory=dict)

    def complete(self) -> bool:
        info = self.info()
        if info is None:
            return False
        if info.get("kind") == "frames":
            frames = [s for s in self.members if s.startswith("f")]
            expected = info.get("num_frames")
            return bool(frames) and (expected is None or len(frames) == expected)
        return str(info.get("member")) in self.members

    def info(self) -> dict | None:
        raw = self.members.get("json")
        if raw is None:
            return None
        try:
            return json.loads(raw.decode("utf-8"))
        except ValueError:
            return None


@dataclass(frozen=True)
class _Missing:
    """A sample that could not be read (its shard cut short or unreachable)."""

    key: int
    reason: str


@dataclass(frozen=True)
class _Segment:
    """Samples [skip, skip + count) of one shard."""

    location: str
    first_key: int
    skip: int
    count: int


def _open_tar(location: str):
    """(tar, stream) for a shard: seekable for a local file (members skipped without reading
    them), streamed through `webdataset.gopen` for URLs and pipes."""
    if not _is_remote(location):
        return tarfile.open(location, mode="r:"), None
    stream = _webdataset().gopen(location, "rb")
    try:
        return tarfile.open(fileobj=stream, mode="r|"), stream
    except BaseException:
        stream.close()
        raise


def _members(location: str, lo: int, hi: int, wanted: Callable[[str], bool]):
    """(key, suffix, data) of the members of keys [lo, hi) that `wanted(suffix)` selects, in tar
    order; stops at the first member past `hi`. Errors (a cut tar, a failed transfer) propagate."""
    tar, stream = _open_tar(location)
    try:
        for info in tar:
            key_text, _, suffix = info.name.partition(".")
            if not info.isreg() or not key_text.isdigit():
                continue
            key = int(key_text)
            if key >= hi:
                break
            if key < lo or not wanted(suffix):
                continue
            handle = tar.extractfile(info)
            yield key, suffix, handle.read() if handle is not None else b""
            tar.members = []  # a stream of thousands of members: keep no TarInfo list
    finally:
        tar.close()
        if stream is not None:
            stream.close()


def _read_segment(segment: _Segment, json_only: bool = False) -> Iterator[_Sample | _Missing]:
    """The segment's samples in key order; a cut or unreachable shard ends with `_Missing` markers
    for the samples not read (a warning names the shard). `json_only` reads only the json members."""
    lo, hi = segment.first_key + segment.skip, segment.first_key + segment.skip + segment.count
    emitted = 0
    pending: _Sample | None = None
    error: str | None = None
    try:
        for key, suffix, data in _members(segment.location, lo, hi, lambda s: not json_only or s == "json"):
            if pending is not None and key != pending.key:
                yield pending
                emitted += 1
                pending = None
            if pending is None:
                pending = _Sample(key)
            pending.members[suffix] = data
    except Exception as exc:  # a cut tar, a failed transfer, a missing file: keep what was read
        error = f"{type(exc).__name__}: {exc}"
    if pending is not None and (error is None or json_only or pending.complete()):
        yield pending
        emitted += 1
    if emitted < segment.count:
        reason = error or "the shard ended early"
        log.warning(
            "shard %s: %d of the %d samples wanted could not be read (%s); they count as unreadable videos",
            segment.location,
            segment.count - emitted,
            segment.count,
            reason,
        )
        for k in range(lo + emitted, hi):
            yield _Missing(k, f"not read from {segment.location}: {reason}")


# -- a sample's video ------------------------------------------------------------------------------------


def _sample_data(sample: _Sample | _Missing, split: str) -> tuple[dict, str, bytes | list[bytes]]:
    """(json, name, data) of a sample: data is the video member's bytes, or the frame members'
    bytes in frame order; name is the recorded source path. VideoDecodeError when the sample is
    missing or lacks its json or its video / frame members."""
    if isinstance(sample, _Missing):
        raise VideoDecodeError(f"{split} key {sample.key}", sample.reason)
    info = sample.info()
    if info is None:
        raise VideoDecodeError(f"{split} key {sample.key}", "no readable json member")
    name = str(info.get("source") or f"{split} key {sample.key}")
    if info.get("kind") == "frames":
        frames = sorted(s for s in sample.members if s.startswith("f") and s[1:7].isdigit())
        if not frames:
            raise VideoDecodeError(name, "no frame members")
        return info, name, [sample.members[s] for s in frames]
    data = sample.members.get(str(info.get("member")))
    if data is None:
        raise VideoDecodeError(name, f"no video member .{info.get('member')}")
    return info, name, data


def _video_reader(data: bytes, info: dict, name: str, threads: int) -> VideoReader:
    reader = VideoReader(data, threads=threads, name=name)
    start, end = info.get("start"), info.get("end")
    if start is not None or end is not None:
        # An untrimmed video packed unchanged: only its time window is the sample.
        if reader.window(start, end).num_frames == 0:
            reader.close()
            raise VideoDecodeError(name, f"no frames in the window [{start}, {end}) s")
    return reader


def probe_shard(
    location: str, split: str, first_key: int, count: int, threads: int = 1
) -> list[tuple[int, str, dict | None, str | None]]:
    """Decode every sample of one shard of `split` fully once (`vmm check-data`): per key in
    [first_key, first_key + count), (key, name, what decoding found, None) or (key, name, None,
    reason) for a sample that does not decode, has an empty time window, or that the shard does
    not hold (cut short, unreachable). name: "<split> key <key> (<recorded source>)". What was
    found is `probe_full_decode`'s dict (the whole packed video) or `FrameFolderReader.probe`'s."""
    found: dict[int, tuple[int, str, dict | None, str | None]] = {}
    for sample in _read_segment(_Segment(location, first_key, 0, count)):
        name = f"{split} key {sample.key}"
        try:
            info, source, data = _sample_data(sample, split)
            name = f"{name} ({source})"
            if isinstance(data, list):
                result = FrameFolderReader(source, images=data).probe()
            else:
                _video_reader(data, info, source, threads).close()  # an empty time window is a bad sample
                # a memoryview: probe_full_decode's errors then name "<memory ...>", not the bytes
                result = probe_full_decode(memoryview(data), threads=threads)
            found[sample.key] = (sample.key, name, result, None)
        except VideoDecodeError as exc:
            found[sample.key] = (sample.key, name, None, exc.reason)
    keys = range(first_key, first_key + count)
    return [found.get(k) or (k, f"{split} key {k}", None, "not in its shard") for k in keys]


# -- the dataset ------------------------------------------------------------------------------------------


class ShardStream(ClipItems, IterableDataset):
    """The samples of one split of a shard set, for one rank (`world`, `rank`): the training share
    or the evaluation keys of the module docstring, as items of `VideoClipDataset` (plus, in
    training, `_worker` and `_pops` tags that `ShardLoader` removes). `len()` is the number of items
    of this rank. `epoch` and `resume` are set by `ShardLoader` before each iteration."""

    def __init__(
        self,
        root: str,
        split: str,
        split_meta: dict,
        *,
        mode: str,
        clip: ClipSettings,
        transform: ClipTransform,
        batch_size: int,
        test_clips: int = 1,
        world: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle_buffer: int = 64,
        max_retries: int = 10,
        max_bad_fraction: float = 0.5,
        flip_labels: list[int] | None = None,
    ):
        super().__init__(mode, clip, transform, test_clips, max_retries, max_bad_fraction, flip_labels)
        if not 0 <= rank < world:
            raise ValueError(f"rank: expected 0 <= rank < world ({world}), got {rank}")
        self.root, self.split = root, split
        shards = split_meta.get("shards")
        if not isinstance(shards, list):
            raise ShardFormatError(f"meta.json: split {split!r} lists no shards")
        try:
            self.shards = [
                (shard_location(root, f"{split}/{s['name']}"), int(s["first_key"]), int(s["num_samples"]))
                for s in shards
            ]
        except (KeyError, TypeError, ValueError) as exc:
            raise ShardFormatError(
                f"meta.json: split {split!r} has a shard entry without a name, first_key or num_samples ({exc!r})"
            ) from None
        self.num_samples = sum(n for _, _, n in self.shards)
        self.batch_size = batch_size
        self.world, self.rank, self.seed = world, rank, int(seed)
        self.shuffle_buffer = max(1, int(shuffle_buffer))
        self.epoch = 0
        self.resume: dict[int, tuple[int, int]] | None = None  # worker -> (batches done, buffer pops)
        self._reported: set[int] = set()

    # -- shares ---------------------------------------------------------------------------------------
    def rank_range(self) -> tuple[int, int]:
        """This rank's positions [start, stop) in the epoch's sequence (keys outside training)."""
        n_all, w, r = self.num_samples, self.world, self.rank
        if self.mode == "train":
            n = n_all // w
            return r * n, (r + 1) * n
        return r * n_all // w, (r + 1) * n_all // w

    def __len__(self) -> int:
        start, stop = self.rank_range()
        return stop - start

    def num_batches(self) -> int:
        return math.ceil(len(self) / self.batch_size)

    def worker_batches(self, worker: int, workers: int) -> tuple[int, int]:
        """Worker `worker`'s batches [first, stop) of this rank's `num_batches()`."""
        nb = self.num_batches()
        return worker * nb // workers, (worker + 1) * nb // workers

    def shard_order(self, epoch: int) -> list[int]:
        """The shards in the order of `epoch` (permuted in training, key order otherwise)."""
        if self.mode != "train":
            return list(range(len(self.shards)))
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, 0x5A4D]))
        return [int(i) for i in rng.permutation(len(self.shards))]

    def _segments(self, order: list[int], start: int, stop: int) -> list[_Segment]:
        out, offset = [], 0
        for i in order:
            location, first_key, count = self.shards[i]
            lo, hi = max(start, offset), min(stop, offset + count)
            if lo < hi:
                out.append(_Segment(location, first_key, lo - offset, hi - lo))
            offset += count
        return out

    def _stream(self, order: list[int], start: int, stop: int) -> Iterator[_Sample | _Missing]:
        for segment in self._segments(order, start, stop):
            yield from _read_segment(segment)

    # -- iteration ------------------------------------------------------------------------------------
    def __iter__(self):
        # Not a generator: the epoch and resume point are read now, when the iterator is made.
        return self._items(self.epoch, dict(self.resume) if self.resume else {})

    def _items(self, epoch: int, resume: dict[int, tuple[int, int]]):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        b0, b1 = self.worker_batches(worker, workers)
        start, stop = self.rank_range()
        first, last = start + b0 * self.batch_size, min(start + b1 * self.batch_size, stop)
        if first >= last:
            return
        if self.mode == "train":
            yield from self._train_items(worker, first, last, epoch, resume.get(worker, (0, 0)))
        else:
            yield from self._eval_items(first, last)

    def _eval_items(self, first: int, last: int):
        expected = first
        for sample in self._stream(self.shard_order(0), first, last):
            yield self._eval_item(sample)
            expected = sample.key + 1
        for key in range(expected, last):  # a shard that held fewer samples than meta.json says
            yield self._eval_item(_Missing(key, "not in its shard"))

    def _eval_item(self, sample: _Sample | _Missing) -> dict:
        try:
            rng = np.random.default_rng(np.random.SeedSequence([0, sample.key, 0, 0]))
            return self._load(sample, rng, eval_mode=True)
        except VideoDecodeError as exc:
            self._report(sample.key, exc)
            return self._empty([sample.key])

    def _train_items(self, worker: int, first: int, last: int, epoch: int, resumed: tuple[int, int]):
        order = self.shard_order(epoch)
        done, pops_done = resumed
        buffer_rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank, worker, 1]))
        n_all = self.num_samples
        # Past the share's end, in the epoch's order and wrapping around: replacements for samples
        # lost to bad members or cut shards, read only when needed.
        tail = (s for a, b in ((last, n_all), (0, last)) for s in self._stream(order, a, b))
        draws = _ShuffleBuffer(self._stream(order, first, last), tail, self.shuffle_buffer, buffer_rng)
        for _ in range(pops_done):  # resuming: replay the draws made before, decoding nothing
            draws.pop()
        for _ in range(last - first - done * self.batch_size):
            item = self._train_item(draws, epoch, worker)
            item["_worker"] = torch.tensor(worker)
            item["_pops"] = torch.tensor(draws.pops)
            yield item

    def _train_item(self, draws: _ShuffleBuffer, epoch: int, worker: int) -> dict:
        bad: list[int] = []
        for _ in range(self.max_retries + 1):
            sample = draws.pop()
            if sample is None:
                raise TooMuchBadData(
                    f"{self.split} shards under {self.root}: no readable sample left for rank {self.rank}'s worker "
                    f"{worker} in epoch {epoch}; most of the data may be unreadable"
                )
            rng = np.random.default_rng(np.random.SeedSequence([self.seed, epoch, self.rank, worker, 2, draws.pops]))
            self._tried.add(sample.key)
            try:
                item = self._load(sample, rng, eval_mode=False)
                item["bad_video_ids"] = torch.tensor(bad, dtype=torch.int64)
                return item
            except VideoDecodeError as exc:
                self._report(sample.key, exc)
                bad.append(sample.key)
                self._count_bad(sample.key, exc)
        raise TooMuchBadData(
            f"{self.max_retries + 1} samples in a row could not be decoded (max_retries={self.max_retries}); "
            f"most of the data may be unreadable. Last: key {bad[-1]} of {self.split}"
        )

    def _report(self, key: int, exc: VideoDecodeError) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning("skipping unreadable video %s (%s key %d): %s", exc.path, self.split, key, exc.reason)

    def _reader(self, sample: _Sample | _Missing):
        info, name, data = _sample_data(sample, self.split)
        if isinstance(data, list):
            return info, FrameFolderReader(name, images=data)
        return info, _video_reader(data, info, name, self.clip.decoder_threads)

    def _load(self, sample: _Sample | _Missing, rng: np.random.Generator, eval_mode: bool) -> dict:
        info, reader = self._reader(sample)
        return self._clip_item(reader, int(info.get("label", -1)), sample.key, rng, eval_mode)


class _ShuffleBuffer:
    """A bounded shuffle of `stream` (then `tail`, unshuffled, once both are drained). `pops` counts
    the samples handed out; the same stream and rng give the same draws, so a resume replays them."""

    def __init__(self, stream, tail, size: int, rng: np.random.Generator):
        self.stream, self.tail, self.size, self.rng = stream, tail, size, rng
        self.buffer: list = []
        self.pops = 0
        self._drained = False

    def pop(self):
        while not self._drained and len(self.buffer) < self.size:
            nxt = next(self.stream, None)
            if nxt is None:
                self._drained = True
            else:
                self.buffer.append(nxt)
        if self.buffer:
            j = int(self.rng.integers(len(self.buffer)))
            self.buffer[j], self.buffer[-1] = self.buffer[-1], self.buffer[j]
            sample = self.buffer.pop()
        else:
            sample = next(self.tail, None)
            if sample is None:
                return None
        self.pops += 1
        return sample


def _collate_tagged(items: list[dict]) -> dict:
    batch = collate_clips(items)
    batch["_worker"] = items[-1]["_worker"]
    batch["_pops"] = items[-1]["_pops"]
    return batch


class ShardLoader(DataLoader):
    """The training DataLoader of a `ShardStream`: sets the stream's epoch before each iteration
    (`epoch_source()`, e.g. the trainer's current epoch; else `set_epoch`), and saves / restores the
    position within the epoch (`state_dict` / `load_state_dict`, which Lightning calls).
    `consumed_source()` gives the number of batches of this epoch that training has used (Lightning
    fetches ahead of them); without it, every batch handed out counts as used."""

    def __init__(
        self,
        dataset: ShardStream,
        *,
        num_workers: int = 0,
        pin_memory: bool = False,
        epoch_source: Callable[[], int | None] | None = None,
        consumed_source: Callable[[], int | None] | None = None,
    ):
        super().__init__(
            dataset,
            batch_size=dataset.batch_size,
            num_workers=num_workers,
            collate_fn=_collate_tagged,
            pin_memory=pin_memory,
            drop_last=False,
        )
        self.epoch = 0
        self.epoch_source = epoch_source
        self.consumed_source = consumed_source
        self._pending: dict | None = None
        self._iter_epoch = 0
        self._base_batches = 0
        self._base_workers: dict[int, tuple[int, int]] = {}
        self._history: list[tuple[int, int]] = []

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _identity(self) -> dict:
        ds: ShardStream = self.dataset
        return {
            "world_size": ds.world,
            "num_workers": self.num_workers,
            "batch_size": ds.batch_size,
            "seed": ds.seed,
            "shuffle_buffer": ds.shuffle_buffer,
            "num_samples": ds.num_samples,
        }

    def __iter__(self):
        ds: ShardStream = self.dataset
        pending, self._pending = self._pending, None
        if pending is not None:
            # The restored epoch, whatever the trainer says now: Lightning may make the iterator
            # before it restores its own epoch counter (`estimated_stepping_batches` does).
            epoch = pending["epoch"]
        else:
            epoch = self.epoch_source() if self.epoch_source is not None else None
            epoch = self.epoch if epoch is None else int(epoch)
        self._iter_epoch = epoch
        self._base_batches = pending["batches"] if pending else 0
        self._base_workers = {int(w): (int(d), int(p)) for w, (d, p) in pending["workers"].items()} if pending else {}
        self._history = []
        ds.epoch = epoch
        ds.resume = dict(self._base_workers) if pending else None
        return self._tracked(super().__iter__())

    def _tracked(self, iterator):
        for batch in iterator:
            self._history.append((int(batch.pop("_worker")), int(batch.pop("_pops"))))
            yield batch

    def state_dict(self) -> dict:
        consumed = self.consumed_source() if self.consumed_source is not None else None
        total = self._base_batches + len(self._history)
        consumed = total if consumed is None else max(self._base_batches, min(int(consumed), total))
        workers = dict(self._base_workers)
        for worker, pops in self._history[: consumed - self._base_batches]:
            done, _ = workers.get(worker, (0, 0))
            workers[worker] = (done + 1, pops)
        return {
            "epoch": self._iter_epoch,
            "batches": consumed,
            "workers": {int(w): [d, p] for w, (d, p) in workers.items()},
            **self._identity(),
        }

    def load_state_dict(self, state: dict) -> None:
        mine = self._identity()
        differ = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if differ:
            shown = ", ".join(f"{k} {a} -> {b}" for k, (a, b) in differ.items())
            warnings.warn(
                f"ShardLoader: the checkpoint's position in epoch {state.get('epoch')} was saved with other settings "
                f"({shown}); the epoch's order starts over on each rank (samples of this epoch may repeat)",
                stacklevel=2,
            )
            self._pending = None
            return
        if int(state["batches"]) >= len(self):  # saved at the epoch's end: the next one starts afresh
            self._pending = {"epoch": int(state["epoch"]) + 1, "batches": 0, "workers": {}}
            return
        self._pending = {
            "epoch": int(state["epoch"]),
            "batches": int(state["batches"]),
            "workers": {int(w): (int(d), int(p)) for w, (d, p) in state["workers"].items()},
        }


# -- the DataModule ---------------------------------------------------------------------------------------


class ShardedVideoDataModule(VideoDataModule):
    """Videos (or frame folders) packed into tar shards by `vmm prepare --format shards`, read from a
    folder, an http(s) URL prefix, another `webdataset.gopen` URL or a `pipe:` command (`{}` = the
    path under the root), streamed by `ShardStream` with the shares, resume and bad-data policies of
    this module's docstring (docs/scale.md). Class names come from meta.json.

    `seed`: the shard / buffer order of every epoch derives from (seed, epoch); every rank must use
    the same one. `shuffle_buffer`: samples held per DataLoader worker for shuffling (each holds a
    video's bytes). `timeout`: seconds to wait for meta.json over http(s). The clip, transform,
    test-view and bad-data arguments are those of `VideoDataModule`. The training loader does not
    keep its workers between epochs (`persistent_workers` applies to evaluation only): each epoch's
    order is set when its workers start.
    """

    def __init__(
        self,
        root: str,
        shuffle_buffer: int = 64,
        seed: int = 0,
        timeout: float = 60.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not isinstance(root, str | os.PathLike) or not str(root):
            raise ValueError(f"root: expected a folder, URL prefix or pipe: command, got {root!r}")
        if shuffle_buffer < 1:
            raise ValueError(f"shuffle_buffer: expected >= 1, got {shuffle_buffer}")
        self.root = str(root) if _is_remote(str(root)) else str(Path(root).expanduser())
        self.shuffle_buffer = int(shuffle_buffer)
        self.seed = int(seed)
        self.timeout = float(timeout)
        self._meta: dict | None = None
        self.streams: dict[str, ShardStream] = {}
        self._train_loader: ShardLoader | None = None
        self._restored_position: dict | None = None

    def _root_needed(self) -> bool:
        return False

    @property
    def meta(self) -> dict:
        """The shard set's meta.json (read on first use)."""
        if self._meta is None:
            self._meta = read_shard_meta(self.root, self.timeout)
        return self._meta

    def _class_names(self) -> list[str]:
        return [str(c) for c in self.meta["classes"]]

    def _split_meta(self, split: str) -> dict | None:
        meta = self.meta["splits"].get(split)
        if meta is None and split == "val":
            meta = self.meta["splits"].get("test")
        if meta is None and split == "test":
            meta = self.meta["splits"].get("val")
        return meta

    def _split_name(self, split: str) -> str:
        splits = self.meta["splits"]
        if split in splits:
            return split
        return {"val": "test", "test": "val"}.get(split, split)

    def has_split(self, split: str) -> bool:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        return self._split_meta(split) is not None

    def shard_list(self, split: str) -> tuple[str, list[tuple[str, int, int]]]:
        """`split`'s name in the shard set (val falls back to test, test to val) and its shards as
        (location, first_key, num_samples)."""
        return self._split_name(split), self._stream(split, "test", world=1, rank=0).shards

    def _load_split(self, split: str) -> list[VideoRecord] | None:
        # One record per packed sample (path: the source path the packer recorded), read from the
        # json members: the names of test reports and predictions. Reads through the split's shards.
        meta = self.meta["splits"].get(split)
        if meta is None:
            return None
        stream = self._stream(split, "test", world=1, rank=0)
        records: dict[int, VideoRecord] = {}
        for location, first_key, count in stream.shards:
            for sample in _read_segment(_Segment(location, first_key, 0, count), json_only=True):
                if isinstance(sample, _Missing):
                    records[sample.key] = VideoRecord(f"{split} key {sample.key}", -1, problem=sample.reason)
                    continue
                info = sample.info() or {}
                source = str(info.get("source") or f"{split} key {sample.key}")
                records[sample.key] = VideoRecord(source, int(info.get("label", -1)))
        total = stream.num_samples
        return [records.get(k, VideoRecord(f"{split} key {k}", -1, problem="not in its shard")) for k in range(total)]

    def records(self, split: str) -> list[VideoRecord]:
        """One record per packed sample of `split` (path: the source path recorded by the packer,
        not checked on this machine), read from the shards' json members on first use."""
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        name = self._split_name(split)
        if name not in self._records:
            recs = self._load_split(name)
            if recs is None:
                raise ValueError(f"{type(self).__name__}: this dataset has no {split!r} split")
            self._records[name] = recs
        return self._records[name]

    def _world(self) -> tuple[int, int]:
        trainer = self._trainer_or_none()
        if trainer is not None and trainer.world_size > 1:
            return trainer.world_size, trainer.global_rank
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(), dist.get_rank()
        return 1, 0

    def _stream(self, split: str, mode: str, world: int, rank: int) -> ShardStream:
        meta = self._split_meta(split)
        if meta is None:
            raise ValueError(f"{type(self).__name__}: the shard set under {self.root} has no {split!r} split")
        transform = {"train": self.train_transform, "val": self.val_transform, "test": self.test_transform}[mode]
        return ShardStream(
            self.root,
            self._split_name(split),
            meta,
            mode=mode,
            clip=self.clip,
            transform=transform,
            batch_size=self.test_batch_size if mode == "test" else self.batch_size,
            test_clips=self.test_clips,
            world=world,
            rank=rank,
            seed=self.seed,
            shuffle_buffer=self.shuffle_buffer,
            max_retries=self.max_retries,
            max_bad_fraction=self.max_bad_fraction,
            flip_labels=self._train_flip_labels() if mode == "train" else None,
        )

    def stream(self, split: str) -> ShardStream:
        """This rank's `ShardStream` of `split` (made on first use, for the current world)."""
        world, rank = self._world()
        current = self.streams.get(split)
        if current is None or (current.world, current.rank) != (world, rank):
            current = self._stream(split, split, world, rank)
            if current.num_samples == 0:
                raise ValueError(f"{type(self).__name__}: the {split!r} split under {self.root} has no samples")
            if len(current) == 0:
                raise ValueError(
                    f"{type(self).__name__}: the {split!r} split has {current.num_samples} samples, fewer than the "
                    f"{world} ranks"
                )
            self.streams[split] = current
        return current

    def dataset(self, split: str):
        return self.stream(split)

    def setup(self, stage: str | None = None) -> None:
        if _is_remote(self.root):
            _webdataset()
        self.class_names  # noqa: B018 (reads and checks meta.json early, on every rank)
        super().setup(stage)

    def _epoch(self) -> int | None:
        trainer = self._trainer_or_none()
        return None if trainer is None else trainer.current_epoch

    def _consumed(self) -> int | None:
        trainer = self._trainer_or_none()
        if trainer is None:
            return None
        return trainer.fit_loop.epoch_loop.batch_progress.current.processed

    def train_dataloader(self) -> ShardLoader:
        loader = ShardLoader(
            self.stream("train"),
            num_workers=fitted_num_workers(self.num_workers),
            pin_memory=self.pin_memory,
            epoch_source=self._epoch,
            consumed_source=self._consumed,
        )
        if self._restored_position is not None:
            loader.load_state_dict(self._restored_position)
            self._restored_position = None
        self._train_loader = loader
        return loader

    # Lightning restores a datamodule's state before it sets up the optimizers, and so before
    # `trainer.estimated_stepping_batches` (an LR schedule) makes the training iterator; the
    # dataloader's own state (which Lightning also saves) is restored only when the iterator is
    # made later. Both carry the same position; the datamodule's is the one that always arrives.
    def state_dict(self) -> dict:
        if self._train_loader is None:
            return {}
        return {"train_position": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self._restored_position = state_dict.get("train_position")

    def _eval_loader(self, split: str) -> DataLoader:
        ds = self.stream(split)
        workers = fitted_num_workers(self.num_workers)
        return DataLoader(
            ds,
            batch_size=ds.batch_size,
            num_workers=workers,
            collate_fn=collate_clips,
            pin_memory=self.pin_memory,
            persistent_workers=self.persistent_workers and workers > 0,
        )

    def val_dataloader(self) -> DataLoader | list:
        if not self.has_split("val"):
            return []
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")
