"""Dataset check: decode every video of a DataModule once, in parallel, and report what was found.

    python -m datamodules.check --config configs/some.yaml [--splits train val] [--num-workers 4]

reads the `data:` section (class_path + init_args) of a vmm config. From code:
`check_datamodule(dm, num_workers=...)` returns a DataCheckReport and prints its table.
"""

from __future__ import annotations

import argparse
import importlib
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from torch.utils.data import DataLoader, Dataset

from .annotations import VideoRecord
from .base import SPLITS, VideoDataModule
from .decode import VideoDecodeError, probe_full_decode
from .frames import FrameRecord, probe_frame_folder

__all__ = ["DataCheckReport", "SplitReport", "check_datamodule", "load_datamodule", "main"]


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
        def stats(xs):
            return (min(xs), statistics.median(xs), max(xs)) if xs else (float("nan"),) * 3

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
    splits: dict[str, SplitReport]
    seconds: float

    @property
    def unreadable(self) -> list[tuple[str, str]]:
        return [u for r in self.splits.values() for u in r.unreadable]

    @property
    def unusable(self) -> list[tuple[str, str]]:
        return [u for r in self.splits.values() for u in r.unusable]

    @property
    def ok(self) -> bool:
        return not self.unreadable and not self.unusable

    def table(self, max_listed: int = 20) -> str:
        head = (
            f"{'split':<6} {'videos':>7} {'ok':>7} {'bad':>5} {'unusable':>8}  "
            f"{'duration s (min/med/max)':<26} {'fps (min/med/max)':<22}"
        )
        rows = [head, "-" * len(head)]
        for r in self.splits.values():
            s = r.summary()
            d, f = s["duration_min_med_max"], s["fps_min_med_max"]
            rows.append(
                f"{r.split:<6} {r.videos:>7} {r.readable:>7} {len(r.unreadable):>5} {len(r.unusable):>8}  "
                f"{d[0]:>7.2f} {d[1]:>8.2f} {d[2]:>8.2f}  {f[0]:>6.2f} {f[1]:>6.2f} {f[2]:>6.2f}"
            )
        for title, bad in (("unusable entries", self.unusable), ("unreadable videos", self.unreadable)):
            if bad:
                rows.append(f"\n{title} ({len(bad)}):")
                rows += [f"  {p}: {why}" for p, why in bad[:max_listed]]
                if len(bad) > max_listed:
                    rows.append(f"  ... and {len(bad) - max_listed} more")
        rows.append(f"\nchecked in {self.seconds:.1f} s")
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
    have are skipped. Prints the table to `out` (default: sys.stdout) unless `print_table` is False."""
    if not isinstance(dm, VideoDataModule):
        raise TypeError(f"dm: expected a datamodules.VideoDataModule, got {type(dm).__name__}")
    t0 = time.perf_counter()
    if hasattr(dm, "prepare_data"):
        dm.prepare_data()
    reports: dict[str, SplitReport] = {}
    for split in splits:
        if not dm.has_split(split):
            continue
        records = dm.records(split)
        report = SplitReport(split, videos=len({r.path for r in records}))
        report.unusable = sorted({(r.path, r.problem) for r in records if r.problem is not None})
        usable = [r for r in records if r.problem is None]
        loader = DataLoader(
            _ProbeDataset(usable, decoder_threads), batch_size=1, num_workers=num_workers, collate_fn=_identity
        )
        for [(path, info, reason)] in loader:
            if info is None:
                report.unreadable.append((path, reason))
                continue
            report.readable += 1
            if info["duration"] is not None:  # frame folders carry no timing
                report.durations.append(info["duration"])
                report.fps.append(info["fps"])
            report.frames.append(info["frames"])
        reports[split] = report
    result = DataCheckReport(reports, time.perf_counter() - t0)
    if print_table:
        print(result.table(), file=out if out is not None else sys.stdout)
    return result


def load_datamodule(config: str | Path) -> VideoDataModule:
    """Instantiate the `data:` section (class_path + init_args) of a vmm YAML config."""
    import yaml

    with open(config, encoding="utf-8") as fh:
        cfg = yaml.safe_load(fh) or {}
    data = cfg.get("data")
    if not isinstance(data, dict) or "class_path" not in data:
        raise ValueError(f"config: {config} has no 'data:' section with a class_path")
    class_path = data["class_path"]
    module_name, _, cls_name = class_path.rpartition(".")
    cls = getattr(importlib.import_module(module_name or "datamodules"), cls_name)
    return cls(**(data.get("init_args") or {}))


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m datamodules.check", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="vmm YAML config with a data: section")
    ap.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    ap.add_argument("--num-workers", type=int, default=2)
    ap.add_argument("--decoder-threads", type=int, default=1)
    args = ap.parse_args(argv)
    dm = load_datamodule(args.config)
    report = check_datamodule(
        dm, splits=args.splits, num_workers=args.num_workers, decoder_threads=args.decoder_threads
    )
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
