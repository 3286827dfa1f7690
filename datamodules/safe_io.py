"""Safe file writes and reads, shared by the data layer and the module (the lowest layer both import).

Atomic writes: every report, clean list and checkpoint is written to a temporary file in the target's
own directory, flushed to disk, then renamed over the target (`os.replace`, atomic on one file system).
A failed write (disk full, a signal, an error while serialising) removes the temporary file and leaves
an older file of that name untouched; readers never see a truncated file. A symlink is written through
(its resolved target is replaced, the link stays); an existing path that is not a regular file (a
device, a FIFO, a socket) is refused, never replaced by a file. Reads of user-named files refuse
devices and FIFOs before opening them.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import stat
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_writer",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "check_readable_file",
    "check_writable_file",
    "to_json_safe",
    "write_target",
]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would have created; mkstemp makes 0600


_KINDS = (
    (stat.S_ISCHR, "character device"),
    (stat.S_ISBLK, "block device"),
    (stat.S_ISFIFO, "FIFO"),
    (stat.S_ISSOCK, "socket"),
)


def write_target(path: str | os.PathLike) -> Path:
    """The file a write to `path` must replace: `path`, or a symlink's resolved target (a rename
    over the link would replace the link itself).

    Raises IsADirectoryError for a directory and ValueError for any other existing path that is
    not a regular file, naming `path` and what it is.
    """
    path = Path(path)
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        mode = os.stat(target).st_mode
    except (FileNotFoundError, NotADirectoryError):  # a new path (its folder's checks come later)
        return target
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"cannot write {path}: it is a directory")
    if not stat.S_ISREG(mode):
        kind = next((name for test, name in _KINDS if test(mode)), "special file")
        via = f" (via the symlink to {target})" if target != path else ""
        raise ValueError(f"cannot write {path}: it is a {kind}{via}; expected a regular file or a new path")
    return target


# A temporary that nobody holds locked and that is older than this was left by a killed write (the
# age covers the instant between a writer's mkstemp and its flock).
_STALE_AFTER_S = 60.0


def _lock(fd: int) -> bool:
    """Take an exclusive flock on `fd` without waiting; False if another holds it or flock is
    unavailable (a platform or file system without it)."""
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (ImportError, OSError):
        return False
    return True


def _remove_stale_temporaries(path: Path) -> None:
    """Delete the temporaries `.<name>.*.tmp` of `path` left by writes that were killed (SIGKILL,
    power loss: no cleanup ran), so checkpoints rewritten every epoch do not pile them up. Those of
    live writes are locked; without flock support nothing is removed."""
    now = time.time()
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        try:
            fd = os.open(tmp, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if stat.S_ISREG(st.st_mode) and now - st.st_mtime > _STALE_AFTER_S and _lock(fd):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, mode: str = "w", encoding: str = "utf-8") -> Iterator[IO]:
    """Open a temporary file next to `path` for writing; on success it replaces `path` atomically.

    Args:
        path: the file to (re)write. Its directory must exist. A symlink is written through to its
            target (see `write_target`); an existing directory (IsADirectoryError) or other
            non-regular file (ValueError) is refused before anything is written.
        mode: "w" (text) or "wb" (binary).
        encoding: text encoding for mode "w".

    On any exception inside the block the temporary file is deleted, `path` is left as it was and
    the exception propagates.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
    path = write_target(path)
    _remove_stale_temporaries(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        _lock(fd)  # held until the file is closed: tells a live write from a killed one
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename itself is durable only once the directory entry is on disk.
    with contextlib.suppress(OSError):
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> None:
    """Write `text` to `path` atomically (see `atomic_writer`)."""
    with atomic_writer(path, "w", encoding=encoding) as f:
        f.write(text)


def to_json_safe(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, ±Inf) replaced by None, so it is valid JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: to_json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_json_safe(v) for v in obj]
    return obj


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write `obj` as indented JSON atomically; NaN/Inf become null (strict JSON, never bare NaN)."""
    atomic_write_text(path, json.dumps(to_json_safe(obj), indent=2, allow_nan=False) + "\n")


def check_writable_file(path: str | os.PathLike, argument: str) -> Path:
    """Fail early (before any inference) when `path` cannot be written as a file.

    Creates missing parent directories, and probes the directory the file will be written in (a
    symlink's target's) with a temporary file. Raises ValueError naming `argument` when `path` is
    a directory, a device, FIFO or socket, or its directory is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{argument} must be a file path, got the existing directory {str(path)!r}")
    try:
        target = write_target(path)
    except ValueError as exc:
        raise ValueError(f"{argument}: {exc}") from None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target.parent):
            pass
    except OSError as exc:
        raise ValueError(
            f"{argument}: cannot write {str(path)!r}: directory {str(target.parent)!r} is not writable "
            f"({exc.strerror or exc})"
        ) from None
    return path


def check_readable_file(path: str | os.PathLike, what: str, max_bytes: int | None = None) -> Path:
    """Refuse, before opening it, a `path` that is not a regular file (a device such as /dev/zero
    would be read for ever, a FIFO blocks the open) or, with `max_bytes`, one larger than that.

    Raises ValueError "<path>: <why> (expected a <what>)", one line; a symlink is followed.
    """
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc} (expected a {what})") from None
    if not stat.S_ISREG(st.st_mode):
        kind = next((n for t, n in ((stat.S_ISDIR, "directory"), *_KINDS) if t(st.st_mode)), "special file")
        raise ValueError(f"{path}: it is a {kind}, not a regular file (expected a {what})")
    if max_bytes is not None and st.st_size > max_bytes:
        raise ValueError(
            f"{path}: {st.st_size / 2**20:.0f} MiB, larger than a {what} can be ({max_bytes / 2**20:.0f} MiB)"
        )
    return path
