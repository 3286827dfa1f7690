"""The synthetic dataset on disk: generated once per generation spec into a cache folder, atomically.

`generate_dataset` writes `<cache_root>/synthetic_motion/<spec digest>/` in the Kinetics layout (a
folder per split and class, CSVs in `annotations/`, `meta.json` last). The files are rendered
(`datamodules.synthetic.render`) and encoded (`datamodules.encode`) into a temporary sibling
`.tmp-*` folder that this run holds an flock on, then the folder is renamed into place under an
flock on the cache folder: concurrent runs (DDP ranks) and killed ones never expose a partial
dataset, and the temporaries of killed runs are removed by the next run.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import shutil
import time
import uuid
from dataclasses import asdict
from pathlib import Path

from ..encode import write_video
from ..safe_io import atomic_write_text
from .render import SPLIT_CODES, SyntheticSpec, render_video, reverse_class

log = logging.getLogger(__name__)

__all__ = ["CacheNotWritableError", "clean_stale_temporaries", "default_cache_root", "generate_dataset"]


def _file_name(spec: SyntheticSpec, split: str, index: int) -> str:
    return f"{split}{index:05d}_{0:06d}_{spec.duration_s():06d}.mp4"


def _write_chunk(args: tuple[SyntheticSpec, str, str, list[int]]) -> None:
    spec, tmp_root, split, indices = args
    for i in indices:
        frames, label = render_video(spec, split, i)
        path = Path(tmp_root) / split / spec.class_names[label] / _file_name(spec, split, i)
        write_video(path, frames, fps=spec.fps, encoder=spec.encoder, crf=spec.crf)


# A `.tmp-*` directory is owned by the run writing it, which holds an flock on it until it is done;
# one that is unlocked and older than this belongs to a run that was killed.
_STALE_AFTER_S = 60.0
# Where flock is unavailable (some network file systems), only this age tells a dead run.
_STALE_UNLOCKABLE_AFTER_S = 24 * 3600.0


class CacheNotWritableError(PermissionError):
    """The synthetic dataset cannot be written where it was asked to go; says where and why."""


def _not_writable(path: Path, exc: OSError) -> CacheNotWritableError:
    return CacheNotWritableError(
        f"cannot write the synthetic motion dataset: {path}: {exc.strerror or exc}. Point the cache at a "
        "writable directory: set the environment variable VMM_CACHE=/some/dir, or the datamodule's "
        "root (data.init_args.root / SyntheticMotionDataModule(root=...))"
    )


def _lock_dir(path: Path, blocking: bool) -> int | None:
    """An fd holding an exclusive flock on directory `path`; None if another process holds it.

    Raises OSError where flock is unsupported (the caller decides what that means)."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system
        raise OSError("flock is not available on this system") from None

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if blocking else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def clean_stale_temporaries(base: Path, now: float | None = None) -> list[Path]:
    """Remove the `.tmp-*` directories under `base` left by killed runs; return what was removed.

    A directory is stale when nobody holds its flock and it is older than `_STALE_AFTER_S` (the
    age covers the instant between a run's mkdir and its flock); without flock support, when it
    is older than `_STALE_UNLOCKABLE_AFTER_S`. Safe to run while other runs generate.
    """
    now = time.time() if now is None else now
    removed = []
    try:
        entries = sorted(base.iterdir())
    except OSError:
        return removed
    for entry in entries:
        try:
            if not entry.name.startswith(".tmp-") or entry.is_symlink() or not entry.is_dir():
                continue
            age = now - entry.stat().st_mtime
            if age < _STALE_AFTER_S:
                continue
            try:
                fd = _lock_dir(entry, blocking=False)
            except OSError:  # no flock here: only a very old directory is surely dead
                if age > _STALE_UNLOCKABLE_AFTER_S:
                    shutil.rmtree(entry, ignore_errors=True)
                    removed.append(entry)
                continue
            if fd is None:
                continue  # a live run holds it
            try:
                shutil.rmtree(entry, ignore_errors=True)
            finally:
                os.close(fd)
            removed.append(entry)
        except OSError:  # it vanished meanwhile (another cleaner), or a read-only cache
            continue
    if removed:
        log.info("removed %d stale temporary dataset folder(s) under %s", len(removed), base)
    return removed


def generate_dataset(spec: SyntheticSpec, cache_root: str | os.PathLike, workers: int = 1) -> Path:
    """Write the dataset to `cache_root/synthetic_motion/<digest>` unless it is there; return the path.

    `meta.json`, written last (atomically), marks a complete dataset. Files are written into a
    temporary sibling `.tmp-*` directory, flock-ed by this run, and renamed into place, so
    concurrent callers (DDP ranks) and interrupted runs never expose a partial dataset; temporary
    directories of killed runs are removed (`clean_stale_temporaries`). A dataset directory
    without `meta.json` (incomplete) is replaced. An unwritable cache raises
    CacheNotWritableError naming the directory.
    """
    base = Path(cache_root).expanduser() / "synthetic_motion"
    final = base / spec.digest()
    if (final / "meta.json").is_file():
        return final
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _not_writable(Path(exc.filename or base), exc) from None
    clean_stale_temporaries(base)
    token = f"{spec.digest()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = base / f".tmp-{token}"
    try:
        tmp.mkdir()
    except OSError as exc:
        raise _not_writable(base, exc) from None
    try:
        own = _lock_dir(tmp, blocking=True)  # held until the end: tells cleaners this run is alive
    except OSError:
        own = None
    aside = None
    try:
        _write_videos(spec, tmp, workers)
        _write_annotations(spec, tmp)
        aside = _place(tmp, final, token)
    finally:
        if own is not None:
            os.close(own)
        for leftover in (tmp, aside):
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)
    return final


def _write_videos(spec: SyntheticSpec, root: Path, workers: int) -> None:
    """Render and encode every video of every split into `root/<split>/<class>/`, on `workers` processes."""
    for split in SPLIT_CODES:
        for name in spec.class_names:
            (root / split / name).mkdir(parents=True)
    jobs = []
    for split in SPLIT_CODES:
        n = spec.per_class(split) * spec.num_classes
        # About four chunks per worker: small enough to balance the load, large enough to amortise dispatch.
        chunk = max(1, math.ceil(n / max(1, workers) / 4))
        jobs += [(spec, str(root), split, list(range(s, min(n, s + chunk)))) for s in range(0, n, chunk)]
    if workers > 1:
        ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
        with ctx.Pool(workers) as pool:
            pool.map(_write_chunk, jobs)
    else:
        for job in jobs:
            _write_chunk(job)


def _write_annotations(spec: SyntheticSpec, root: Path) -> None:
    """Write the Kinetics-style split CSVs to `root/annotations/`, then `root/meta.json` (last: it marks completion)."""
    (root / "annotations").mkdir()
    csv_names = {"train": "train.csv", "val": "validate.csv", "test": "test.csv"}
    for split, csv_name in csv_names.items():
        lines = ["label,youtube_id,time_start,time_end,split"]
        for i in range(spec.per_class(split) * spec.num_classes):
            name = spec.class_names[i % spec.num_classes]
            lines.append(f"{name},{split}{i:05d},0,{spec.duration_s()},{split}")
        atomic_write_text(root / "annotations" / csv_name, "\n".join(lines) + "\n")
    meta = {
        "spec": asdict(spec),
        "class_names": spec.class_names,
        "reverse_of": [reverse_class(i, spec.task) for i in range(spec.num_classes)],
    }
    atomic_write_text(root / "meta.json", json.dumps(meta, indent=1))


def _place(tmp: Path, final: Path, token: str) -> Path | None:
    """Rename the finished `tmp` to `final`, serialised between processes by an flock on the cache
    folder. A complete `final` (another run won) is kept; an incomplete one (no meta.json) is moved
    aside, and that path returned for removal."""
    try:
        lock = _lock_dir(final.parent, blocking=True)
    except OSError:
        lock = None  # no flock: the renames below are still atomic, only the swap is unguarded
    aside = None
    try:
        if (final / "meta.json").is_file():
            return None  # another process finished first; its files are the same
        if final.exists():
            aside = final.parent / f".tmp-{token}-incomplete"
            log.warning("%s has no meta.json (an incomplete dataset): replacing it", final)
            os.rename(final, aside)
        os.rename(tmp, final)
    finally:
        if lock is not None:
            os.close(lock)
    return aside


def default_cache_root() -> Path:
    """`$VMM_CACHE`, else `~/.cache/vmm`."""
    return Path(os.environ.get("VMM_CACHE") or Path.home() / ".cache" / "vmm").expanduser()
