"""Dataset check: decode every video of a DataModule once, in parallel, and report what was found.

    vmm check-data --config configs/some.yaml [--splits [train, val]] [--num_workers 4] [--write_clean_list clean.txt]

reads the `data:` section (class_path + init_args) of a vmm config. A file listed in several
splits is decoded once. From code: `check_datamodule(dm, num_workers=...)` returns a
DataCheckReport and prints its table; `write_clean_lists(dm, report, path)` writes each checked
split's annotation list without its bad entries.

For a shard set (ShardedVideoDataModule) every packed sample is decoded once from its shard, one
shard per work item: the videos of the report are the samples of each split, named
"<split> key <key> (<recorded source path>)"; a sample its shard does not hold (cut short,
unreachable) is unreadable. A shard set has no lists to clean.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from torch.utils.data import DataLoader, Dataset

from .annotations import VideoRecord
from .base import SPLITS, VideoDataModule
from .decode import VideoDecodeError, probe_full_decode
from .frames import FrameRecord, probe_frame_folder
from .sharded import ShardedVideoDataModule, probe_shard

__all__ = [
    "DataCheckReport",
    "SplitReport",
    "check_datamodule",
    "clean_list_files",
    "write_clean_lists",
]


@dataclass
class SplitReport:
    """What decoding every video of one split found. Durations in seconds, rates in frames/s."""

    split: str
    videos: int = 0  # distinct entries, usable or not
    readable: int = 0
    unreadable: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): failed to decode
    # (path, reason): known unusable from the listing (missing, dangling link, FIFO, ...); not opened
    unusable: list[tuple[str, str]] = field(default_factory=list)
    durations: list[float] = field(default_factory=list)
    fps: list[float] = field(default_factory=list)
    frames: list[int] = field(default_factory=list)

    def summary(self) -> dict:
        def stats(xs):  # None, not NaN, when unknown (frame folders carry no timing; an empty split)
            return (min(xs), statistics.median(xs), max(xs)) if xs else None

        return {
            "split": self.split,
            "videos": self.videos,
            "readable": self.readable,
            "unreadable": len(self.unreadable),
            "unusable": len(self.unusable),
            "duration_min_med_max": stats(self.durations),
            "fps_min_med_max": stats(self.fps),
            "frames_min_med_max": stats(self.frames),
        }


@dataclass
class DataCheckReport:
    """Per-split reports; `decoded`: how many distinct videos were opened (a file listed in several
    splits once); `probed`: what decoding each readable path found (frames, duration, fps)."""

    splits: dict[str, SplitReport]
    seconds: float
    decoded: int = 0
    probed: dict[str, dict] = field(default_factory=dict)

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        """Every distinct (path, reason) that failed to decode, over all splits."""
        return sorted({u for r in self.splits.values() for u in r.unreadable})

    @property
    def unusable(self) -> list[tuple[str, str]]:
        """Every distinct (path, reason) known unusable from the listing, over all splits."""
        return sorted({u for r in self.splits.values() for u in r.unusable})

    def bad_paths(self, split: str) -> set[str]:
        """The paths of `split` that are unreadable or unusable."""
        r = self.splits[split]
        return {p for p, _ in r.unreadable} | {p for p, _ in r.unusable}

    @property
    def empty_splits(self) -> list[str]:
        """The checked splits that list no entry at all (a training or test run on them cannot work)."""
        return [name for name, r in self.splits.items() if r.videos == 0]

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.unusable and not self.empty_splits

    def table(self, max_listed: int = 20) -> str:
        head = (
            f"{'split':<6} {'videos':>7} {'ok':>7} {'bad':>5} {'unusable':>8}  "
            f"{'duration s (min/med/max)':<26} {'fps (min/med/max)':<22} {'frames (min/med/max)':<20}"
        )
        rows = [head, "-" * len(head)]

        def cols(values, widths: tuple[int, ...], fmt: str) -> str:  # "-" where nothing is known
            if values is None:
                return " ".join(f"{'-':>{w}}" for w in widths)
            return " ".join(f"{v:>{w}{fmt}}" for v, w in zip(values, widths, strict=True))

        for r in self.splits.values():
            s = r.summary()
            rows.append(
                f"{r.split:<6} {r.videos:>7} {r.readable:>7} {len(r.unreadable):>5} {len(r.unusable):>8}  "
                f"{cols(s['duration_min_med_max'], (7, 8, 8), '.2f')}  {cols(s['fps_min_med_max'], (6, 6, 6), '.2f')}"
                f"   {cols(s['frames_min_med_max'], (6, 6, 6), '.0f')}"
            )
        if self.empty_splits:
            rows.append(
                f"\nempty splits ({len(self.empty_splits)}): {', '.join(self.empty_splits)} (no entries listed)"
            )
        for title, bad in (("unusable entries", self.unusable), ("unreadable videos", self.unreadable)):
            if bad:
                rows.append(f"\n{title} ({len(bad)}):")
                rows += [f"  {p}: {why}" for p, why in bad[:max_listed]]
                if len(bad) > max_listed:
                    rows.append(f"  ... and {len(bad) - max_listed} more")
        rows.append(f"\nchecked {self.decoded} distinct videos in {self.seconds:.1f} s")
        return "\n".join(rows)


class _ProbeDataset(Dataset):
    def __init__(self, records: Sequence[VideoRecord], threads: int):
        self.paths = sorted({r.path for r in records})
        self.frame_records = {r.path: r for r in records if isinstance(r, FrameRecord)}
        self.threads = threads

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[str, dict | None, str | None]:
        path = self.paths[i]
        try:
            if path in self.frame_records:
                return path, probe_frame_folder(self.frame_records[path]), None
            return path, probe_full_decode(path, threads=self.threads), None
        except VideoDecodeError as exc:
            return path, None, exc.reason


def _identity(batch):
    return batch


class _ShardProbeDataset(Dataset):
    def __init__(self, shards: Sequence[tuple[str, str, int, int]], threads: int):
        self.shards = list(shards)  # (split, location, first_key, count)
        self.threads = threads

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, i: int) -> tuple[str, list]:
        split, location, first_key, count = self.shards[i]
        return split, probe_shard(location, split, first_key, count, threads=self.threads)


def _check_shards(
    dm: ShardedVideoDataModule, splits: Sequence[str], num_workers: int, decoder_threads: int
) -> tuple[dict[str, SplitReport], dict[str, tuple[dict | None, str | None]]]:
    # Every packed sample decoded once (a split the shard set lacks may fall back to another: its
    # shards are read once), one shard per work item; samples are named by split and key.
    names = {split: dm.shard_list(split) for split in dict.fromkeys(splits) if dm.has_split(split)}
    shards = {(name, loc, first, count) for name, listed in names.values() for loc, first, count in listed}
    loader = DataLoader(
        _ShardProbeDataset(sorted(shards), decoder_threads),
        batch_size=1,
        num_workers=num_workers,
        collate_fn=_identity,
    )
    samples: dict[str, list[tuple[int, str, dict | None, str | None]]] = {}
    for [(name, probed)] in loader:
        samples.setdefault(name, []).extend(probed)
    reports: dict[str, SplitReport] = {}
    for split, (name, _) in names.items():
        report = SplitReport(split, videos=len(samples.get(name, [])))
        for _, where, info, reason in sorted(samples.get(name, [])):
            _count(report, where, info, reason)
        reports[split] = report
    found = {where: (info, reason) for probed in samples.values() for _, where, info, reason in probed}
    return reports, found


def check_datamodule(
    dm: VideoDataModule,
    *,
    splits: Sequence[str] = SPLITS,
    num_workers: int = 2,
    decoder_threads: int = 1,
    out: TextIO | None = None,
    print_table: bool = True,
) -> DataCheckReport:
    """Decode every video of `splits` once (`num_workers` processes) and report unreadable files,
    durations and frame rates. Entries known to be unusable from the listing (`dm.unusable`:
    missing, dangling links, FIFOs, ...) are listed and never opened. Splits the layout does not
    have are skipped. For a ShardedVideoDataModule every packed sample is decoded from its shard
    (module docstring). Prints the table to `out` (default: sys.stdout) unless `print_table` is False."""
    if not isinstance(dm, VideoDataModule):
        raise TypeError(f"dm: expected a datamodules.VideoDataModule, got {type(dm).__name__}")
    t0 = time.perf_counter()
    if isinstance(dm, ShardedVideoDataModule):
        reports, found = _check_shards(dm, splits, num_workers, decoder_threads)
    else:
        reports, found = _check_files(dm, splits, num_workers, decoder_threads)
    probed = {path: info for path, (info, _) in found.items() if info is not None}
    result = DataCheckReport(reports, time.perf_counter() - t0, decoded=len(found), probed=probed)
    if print_table:
        print(result.table(), file=out if out is not None else sys.stdout)
    return result


def _check_files(
    dm: VideoDataModule, splits: Sequence[str], num_workers: int, decoder_threads: int
) -> tuple[dict[str, SplitReport], dict[str, tuple[dict | None, str | None]]]:
    if hasattr(dm, "prepare_data"):
        dm.prepare_data()
    split_records = {split: dm.records(split) for split in dict.fromkeys(splits) if dm.has_split(split)}
    # Splits may share files (val falling back to test, overlapping lists): each path is opened once.
    usable = {r.path: r for recs in split_records.values() for r in recs if r.problem is None}
    loader = DataLoader(
        _ProbeDataset(list(usable.values()), decoder_threads),
        batch_size=1,
        num_workers=num_workers,
        collate_fn=_identity,
    )
    found: dict[str, tuple[dict | None, str | None]] = {path: (info, reason) for [(path, info, reason)] in loader}
    reports: dict[str, SplitReport] = {}
    for split, records in split_records.items():
        report = SplitReport(split, videos=len({r.path for r in records}))
        report.unusable = sorted({(r.path, r.problem) for r in records if r.problem is not None})
        for path in sorted({r.path for r in records if r.problem is None}):
            _count(report, path, *found[path])
        reports[split] = report
    return reports, found


def _count(report: SplitReport, name: str, info: dict | None, reason: str | None) -> None:
    if info is None:
        report.unreadable.append((name, reason))
        return
    report.readable += 1
    if info["duration"] is not None:  # frame folders carry no timing
        report.durations.append(info["duration"])
        report.fps.append(info["fps"])
    report.frames.append(info["frames"])


def clean_list_files(dm: VideoDataModule, splits: Sequence[str], path: str | os.PathLike) -> dict[str, Path]:
    """Where `write_clean_lists` writes each split of `splits` that `dm` has: `<stem>_<split><suffix>`
    beside `path` (clean.txt -> clean_train.txt). Raises ValueError (naming `write_clean_list`)
    when the path is a folder, or when a split has entries a list cannot hold (time windows of
    untrimmed videos), or when a list cannot be written there (an unwritable folder, a device) --
    before anything is decoded."""
    from .safe_io import check_writable_file  # the writer's own checks (see write_clean_lists)

    if isinstance(dm, ShardedVideoDataModule):
        raise ValueError(
            "write_clean_list: a shard set has no annotation lists to clean; write clean lists from the "
            "datamodule that was packed (or prepare the shards again from it)"
        )
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"write_clean_list: expected a file path, got the existing folder {str(path)!r}")
    files = {}
    for split in dict.fromkeys(splits):
        if not dm.has_split(split):
            continue
        file = path.with_name(f"{path.stem}_{split}{path.suffix}")
        check_writable_file(file, "write_clean_list")
        windowed = [r.path for r in dm.records(split) if r.start is not None or r.end is not None]
        if windowed:
            raise ValueError(
                f"write_clean_list: the {split!r} split has {len(windowed)} entries with a time window (untrimmed "
                f"videos, e.g. {windowed[0]}); a path-label list cannot hold them. Trim the videos first"
            )
        files[split] = file
    return files


def write_clean_lists(dm: VideoDataModule, report: DataCheckReport, path: str | os.PathLike) -> list[Path]:
    """Write, for each split of `report`, its annotation list without the unreadable and unusable
    entries (`clean_list_files` says where), in listed order; returns the files written.

    Format: `path label` per line with absolute paths (read by VideoListDataModule, any `root`),
    or `folder num_frames label` when every entry is a frame folder (read by
    RawFrameListDataModule; num_frames as listed, else as counted by the check), headed by a `#`
    comment naming the frames' `frame_template` and `frame_start_index` to pass to it. Labels are the
    datamodule's class ids; `class_names` of the original layout still apply. Unlabelled splits
    (label -1, e.g. Something-Something's test split) are not written: no list reader takes them.
    """
    # The CLI's atomic writer (symlinks written through, devices refused); imported here, not at
    # module level, so the data stack alone does not load Lightning.
    from .safe_io import atomic_write_text

    files = clean_list_files(dm, list(report.splits), path)
    written = []
    for split, file in files.items():
        bad = report.bad_paths(split)
        kept = [r for r in dm.records(split) if r.path not in bad]
        if kept and all(r.label < 0 for r in kept):
            warnings.warn(f"check-data: split {split!r} is unlabelled; no clean list written for it", stacklevel=2)
            continue
        frames = bool(kept) and all(isinstance(r, FrameRecord) for r in kept)
        lines = []
        if frames:
            naming = sorted({(r.template, r.start_index) for r in kept})
            lines += [f"# frame_template: {t!r}  frame_start_index: {i}\n" for t, i in naming]
        for r in kept:
            where = os.path.abspath(r.path)
            if frames:
                count = r.num_frames if r.num_frames is not None else report.probed[r.path]["frames"]
                offset = f"{r.offset} " if r.offset else ""  # MMAction2's with-offset form
                lines.append(f"{where} {offset}{count} {r.label}\n")
            else:
                lines.append(f"{where} {r.label}\n")
        file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(file, "".join(lines))  # a reader never sees half a list
        written.append(file)
    return written
