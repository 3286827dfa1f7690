"""Annotation layouts -> lists of VideoRecord. Every parser raises AnnotationError (a ValueError)
naming the file and line for a malformed row or an unknown class.

Conventions (those of the official releases and of the usual toolkits):
- folders: class ids are the sorted class-folder names;
- `path label` lists: 0-based integer labels, paths relative to a root;
- Kinetics CSV: class ids are the sorted unique labels of the training CSV;
- HMDB-51: `<class>_test_split{1,2,3}.txt` with flag 1 = train, 2 = test, 0 = unused; class ids are
  the sorted class names;
- UCF-101: `classInd.txt` with 1-based ids (stored 0-based here), `trainlist0N.txt` with a label,
  `testlist0N.txt` without (label from the class folder).

Text files are read as UTF-8 (a leading byte-order mark is dropped); other encodings give an
AnnotationError naming the file and line. Entries that cannot be used (a listed file that is
missing, a dangling symbolic link, a link loop, a FIFO or other non-regular file) are kept as
records with `problem` set, so they are counted and reported instead of vanishing
(docs/data.md §5; `check_records`).
"""

from __future__ import annotations

import csv
import errno
import io
import json
import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv", ".ogv")

__all__ = [
    "AnnotationError",
    "VIDEO_EXTENSIONS",
    "VideoRecord",
    "check_records",
    "entry_problem",
    "index_video_files",
    "parse_folder",
    "parse_hmdb51",
    "parse_kinetics_csv",
    "parse_path_label_list",
    "parse_ucf101",
    "read_class_names",
    "read_json",
    "record_problem",
]


class AnnotationError(ValueError):
    """A malformed annotation file; the message names the file and line."""

    def __init__(self, file: str | os.PathLike, line: int | None, message: str):
        where = f"{file}:{line}" if line is not None else str(file)
        super().__init__(f"{where}: {message}")
        self.file, self.line = str(file), line


@dataclass(frozen=True)
class VideoRecord:
    """One video of a split: file, 0-based label (-1 if unknown) and optional time window (seconds).

    `problem`: why the entry cannot be used (listed but missing, a dangling link, a FIFO, ...), or
    None. Such an entry is never opened; datasets treat it as an unreadable video.
    """

    path: str
    label: int
    start: float | None = None
    end: float | None = None
    problem: str | None = field(default=None, kw_only=True)


def entry_problem(path: str | os.PathLike, folder: bool = False) -> str | None:
    """Why `path` cannot be used as a video file (`folder=True`: as a frame folder), or None.

    Only stat/lstat/readlink are called, never open: opening a FIFO would block forever.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        return _stat_failure(path, exc, folder)
    mode = st.st_mode
    if folder:
        return None if stat.S_ISDIR(mode) else "not a folder (expected a folder of frame images)"
    return None if stat.S_ISREG(mode) else _not_a_file(mode)


def _stat_failure(path: str | os.PathLike, exc: OSError, folder: bool) -> str:
    """Why `os.stat(path)` raised `exc`: a link loop, a dangling link, a missing entry, or the OS's reason."""
    if exc.errno == errno.ELOOP:
        return "symbolic link loop"
    try:
        is_link = stat.S_ISLNK(os.lstat(path).st_mode)
    except OSError:
        is_link = False
    if is_link and exc.errno in (errno.ENOENT, errno.ENOTDIR):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        return f"dangling symbolic link (target {target} not found)"
    if exc.errno == errno.ENOENT:
        return "frame folder not found" if folder else "file not found"
    return f"cannot stat: {exc.strerror or exc}"


def _not_a_file(mode: int) -> str:
    """What an entry with stat mode `mode` is, for one that is not a regular file."""
    if stat.S_ISDIR(mode):
        return "a directory, not a video file"
    if stat.S_ISFIFO(mode):
        return "not a regular file (a FIFO / named pipe; not opened)"
    if stat.S_ISSOCK(mode):
        return "not a regular file (a socket)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "not a regular file (a device)"
    return "not a regular file"


def record_problem(record: VideoRecord) -> str | None:
    """`entry_problem` of the record's path: a video file, or a frame folder for frame records."""
    # Frame-folder records (datamodules/frames.py) carry a `template` and name a folder.
    return entry_problem(record.path, folder=hasattr(record, "template"))


def check_records(records: Sequence[VideoRecord]) -> list[VideoRecord]:
    """`records` with `problem` set on every entry that cannot be used (one stat per entry; entries
    that already have a problem are kept as they are)."""
    return [r if r.problem is not None else _checked(r) for r in records]


def _checked(record: VideoRecord) -> VideoRecord:
    problem = record_problem(record)
    return record if problem is None else replace(record, problem=problem)


def read_annotation_text(file: Path) -> str:
    """The whole text file decoded as UTF-8 (a leading byte-order mark dropped); AnnotationError
    naming the file and line when it is not UTF-8 or not found."""
    try:
        data = Path(file).read_bytes()
    except FileNotFoundError:
        raise AnnotationError(file, None, "annotation file not found") from None
    except IsADirectoryError:
        raise AnnotationError(file, None, "expected an annotation file, got a directory") from None
    except OSError as exc:
        raise AnnotationError(file, None, f"cannot read: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise AnnotationError(
            file,
            line,
            f"not UTF-8 text (byte 0x{data[exc.start]:02x} at column {column}); "
            "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
        ) from None


def annotation_lines(file: Path) -> Iterable[tuple[int, str]]:
    if not Path(file).is_file():
        raise AnnotationError(file, None, "annotation file not found")
    for n, line in enumerate(read_annotation_text(file).split("\n"), start=1):
        line = line.strip()
        if line and not line.startswith("#"):
            yield n, line


def list_lines(file: Path, form: str) -> Iterable[tuple[int, str]]:
    """`annotation_lines` of a text list whose lines read `form` ("path label"); a JSON file (a
    `.json` name, or text that starts with [ or {, as MMAction2's JSON lists) is an AnnotationError
    naming the format rather than a complaint about its first line."""
    lines = annotation_lines(file)
    first = next(iter(lines), None)
    if first is not None and (Path(file).suffix.lower() == ".json" or (first[1][0] in "[{" and _is_json(file))):
        raise AnnotationError(
            file, None, f"unsupported format (JSON): expected '{form}' lines (a text list, one video per line)"
        )
    if first is not None:
        yield first
        yield from lines


def _is_json(file: Path) -> bool:
    try:
        json.loads(read_annotation_text(file))
    except ValueError:
        return False  # e.g. a path that starts with a bracket
    return True


def parse_folder(split_dir: Path, class_names: list[str] | None = None) -> tuple[list[VideoRecord], list[str]]:
    """`split_dir/<class>/<video>`: records and the class names (sorted folder names unless given).

    Every entry with a video extension is a record, usable or not (a dangling link, a FIFO: see
    `check_records`), so none vanishes from the split. A link to a class folder that does not
    resolve is logged.
    """
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise AnnotationError(split_dir, None, "split folder not found")
    for d in sorted(split_dir.iterdir()):
        if d.is_symlink() and not d.exists():
            log.warning("%s: %s; the videos of this class folder cannot be listed", d, entry_problem(d))
    found = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    names = list(class_names) if class_names is not None else found
    ids = {n: i for i, n in enumerate(names)}
    records = []
    for cls in found:
        if cls not in ids:
            raise AnnotationError(split_dir / cls, None, f"class folder {cls!r} is not one of the {len(names)} classes")
        for p in sorted((split_dir / cls).iterdir()):
            if p.suffix.lower() in VIDEO_EXTENSIONS:
                records.append(VideoRecord(str(p), ids[cls]))
    return records, names


def read_json(file: Path) -> object:
    """The JSON value of `file` (UTF-8); AnnotationError naming the file and line if it is not JSON."""
    text = read_annotation_text(Path(file))
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise AnnotationError(file, exc.lineno, f"not valid JSON: {exc.msg}") from None


def read_class_names(file: Path) -> list[str]:
    """Class names in id order from `file`.

    A `.json` file holds an object {class name: id} (ids 0..K-1, integers or integer strings, as
    Something-Something V2's labels.json) or a list of names. Any other file holds one class name
    per line (ids in file order); `N name` lines (UCF classInd style) are also accepted.
    """
    file = Path(file)
    if file.suffix.lower() == ".json":
        return _class_names_from_json(file, read_json(file))
    names = []
    for n, line in annotation_lines(file):
        if n == 1 and line[0] in "{[":
            raise AnnotationError(
                file, n, "expected one class name per line, got JSON (name the file *.json to read it as JSON)"
            )
        parts = line.split(maxsplit=1)
        if len(parts) == 2 and parts[0].isdigit():
            if int(parts[0]) != len(names) + 1:
                raise AnnotationError(file, n, f"expected class id {len(names) + 1}, got {parts[0]}")
            names.append(parts[1].strip())
        else:
            names.append(line)
    if len(set(names)) != len(names):
        raise AnnotationError(file, None, "duplicate class names")
    return names


def _class_names_from_json(file: Path, raw: object) -> list[str]:
    if isinstance(raw, list) and raw and all(isinstance(n, str) and n.strip() for n in raw):
        names = [n.strip() for n in raw]
    elif isinstance(raw, dict) and raw:
        for k, v in raw.items():
            # int() would take True as 1 and 2.0 as 2: ids are integers or integer strings only
            if isinstance(v, bool) or not isinstance(v, int | str) or (isinstance(v, str) and not v.strip().isdigit()):
                raise AnnotationError(file, None, f'expected integer class ids (e.g. 0 or "0"); class {k!r} has {v!r}')
        by_id = {int(v): str(k) for k, v in raw.items()}
        if sorted(by_id) != list(range(len(raw))):
            raise AnnotationError(file, None, f"expected the ids 0..{len(raw) - 1} once each")
        names = [by_id[i] for i in range(len(raw))]
    else:
        raise AnnotationError(
            file, None, "expected a JSON object {class name: id} or a list of class names (non-empty strings)"
        )
    if len(set(names)) != len(names):
        raise AnnotationError(file, None, "duplicate class names")
    return names


_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?\Z")


def numeric_tail(head: str) -> tuple[str, list[str]]:
    """`head` split into its first part and the number columns that end it ("a b 1 2" -> ("a b",
    ["1", "2"])); the first column is never taken. Extra columns of a list line show up here."""
    numbers: list[str] = []
    while True:
        parts = head.rsplit(maxsplit=1)
        if len(parts) != 2 or not _NUMBER.match(parts[1]):
            return head, numbers
        head, numbers = parts[0], [parts[1], *numbers]


def parse_path_label_list(file: Path, root: Path, num_classes: int | None = None) -> list[VideoRecord]:
    """`path label` lines (space separated, path may contain spaces); paths relative to `root`.

    More number columns (multi-label `path label1 label2`, time windows `path start end label`)
    are an AnnotationError, unless the whole text before the label names an existing path.
    """
    records = []
    for n, line in list_lines(Path(file), "path label"):
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2:
            raise AnnotationError(file, n, f"expected 'path label', got {line!r}")
        _, extra = numeric_tail(parts[0])
        if extra and not os.path.lexists(Path(root) / parts[0].strip()):
            raise AnnotationError(
                file,
                n,
                f"expected 'path label', got {len(extra) + 1} number columns after the path in {line!r}: multi-label "
                "('path label1 label2 ...'), time windows and other extra columns are not supported",
            )
        try:
            label = int(parts[1])
        except ValueError:
            raise AnnotationError(file, n, f"label must be an integer, got {parts[1]!r}") from None
        if label < 0 or (num_classes is not None and label >= num_classes):
            bound = f"[0, {num_classes})" if num_classes is not None else ">= 0"
            raise AnnotationError(file, n, f"unknown class {label}: expected a label in {bound}")
        records.append(VideoRecord(str(Path(root) / parts[0].strip()), label))
    return records


_KINETICS_COLUMNS = ("label", "youtube_id", "time_start", "time_end")


def index_video_files(root: Path) -> dict[str, str]:
    """Map file stem -> path for every video file name under `root` (recursively; first found
    wins). Names only: links and FIFOs are listed too and are checked later (`check_records`)."""
    found: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for f in sorted(filenames):
            stem, ext = os.path.splitext(f)
            if ext.lower() in VIDEO_EXTENSIONS:
                found.setdefault(stem, os.path.join(dirpath, f))
    return found


def parse_kinetics_csv(
    file: Path,
    files: dict[str, str],
    class_to_id: dict[str, int] | None,
    video_dir: str | os.PathLike = "video_dir",
    unlabelled_ok: bool = False,
) -> tuple[list[VideoRecord], list[str], list[str]]:
    """Official Kinetics CSV (`label,youtube_id,time_start,time_end,split[,...]`, header required).

    `files` maps file stems to paths (see `index_video_files`). A row resolves to the trimmed file
    `{youtube_id}_{start:06d}_{end:06d}` (whole file) or else the untrimmed `{youtube_id}` (window
    [time_start, time_end) honoured). `class_to_id=None` accepts any label (the training CSV, whose
    sorted labels define the ids; records then get label -1). Returns (records, the labels of all
    rows, names of the listed videos not found). A listed video not found is a record too, named
    by its trimmed name, with `problem` saying so (it counts as unreadable, see the module doc);
    `video_dir` is the folder named in that message. `unlabelled_ok`: a CSV without a `label`
    column (the official test CSV) gives records with label -1 and labels "".
    """
    file = Path(file)
    if not file.is_file():
        raise AnnotationError(file, None, "annotation file not found")
    records, labels, missing = [], [], []
    with io.StringIO(read_annotation_text(file), newline="") as fh:
        reader = csv.reader(fh)
        num_columns, pos = _kinetics_header(file, next(reader, None), unlabelled_ok)
        for row in reader:
            n = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            label, yid, t0, t1 = _kinetics_row(file, n, row, num_columns, pos, class_to_id)
            trimmed = f"{yid}_{int(t0):06d}_{int(t1):06d}"
            labels.append(label)
            label_id = -1 if class_to_id is None or "label" not in pos else class_to_id[label]
            if trimmed in files:
                records.append(VideoRecord(files[trimmed], label_id))
            elif yid in files:
                records.append(VideoRecord(files[yid], label_id, t0, t1))
            else:
                missing.append(trimmed)
                problem = f"listed in {file.name}:{n}; no video file {trimmed}.* or {yid}.* under {video_dir}"
                records.append(VideoRecord(trimmed, label_id, problem=problem))
    return records, labels, missing


def _kinetics_header(file: Path, header: list[str] | None, unlabelled_ok: bool = False) -> tuple[int, dict[str, int]]:
    """(number of columns, position of each of `_KINETICS_COLUMNS` present) from the CSV's header
    row; "label" may be absent when `unlabelled_ok`."""
    if header is None:
        raise AnnotationError(file, 1, "empty CSV (a header row is required)")
    cols = [h.strip() for h in header]
    absent = [c for c in _KINETICS_COLUMNS if c not in cols and not (c == "label" and unlabelled_ok)]
    if absent:
        raise AnnotationError(file, 1, f"header lacks column(s) {absent}; got {cols}")
    return len(cols), {c: cols.index(c) for c in _KINETICS_COLUMNS if c in cols}


def _kinetics_row(
    file: Path, n: int, row: list[str], num_columns: int, pos: dict[str, int], class_to_id: dict[str, int] | None
) -> tuple[str, str, float, float]:
    """(label, youtube_id, time_start, time_end in seconds) of CSV line `n`; AnnotationError if malformed."""
    if len(row) < num_columns:
        raise AnnotationError(file, n, f"expected {num_columns} columns, got {len(row)}: {row}")
    label = row[pos["label"]].strip() if "label" in pos else ""
    yid = row[pos["youtube_id"]].strip()
    try:
        t0, t1 = float(row[pos["time_start"]]), float(row[pos["time_end"]])
    except ValueError:
        raise AnnotationError(file, n, f"time_start/time_end must be numbers, got {row}") from None
    if not yid or t1 <= t0:
        raise AnnotationError(file, n, f"expected a youtube_id and time_end > time_start, got {row}")
    if class_to_id is not None and "label" in pos and label not in class_to_id:
        raise AnnotationError(file, n, f"unknown class {label!r} (not in the training CSV)")
    return label, yid, t0, t1


def parse_hmdb51(split_dir: Path, video_root: Path, split: int) -> tuple[dict[str, list[VideoRecord]], list[str]]:
    """HMDB-51 `<class>_test_split{split}.txt` files -> ({"train": [...], "test": [...]}, class names)."""
    split_dir = Path(split_dir)
    if split not in (1, 2, 3):
        raise ValueError(f"split: expected 1, 2 or 3, got {split}")
    suffix = f"_test_split{split}.txt"
    files = sorted(split_dir.glob(f"*{suffix}")) if split_dir.is_dir() else []
    if not files:
        raise AnnotationError(split_dir, None, f"no '*{suffix}' files found")
    names = sorted(f.name[: -len(suffix)] for f in files)
    out: dict[str, list[VideoRecord]] = {"train": [], "test": []}
    for label, cls in enumerate(names):
        file = split_dir / f"{cls}{suffix}"
        for n, line in annotation_lines(file):
            parts = line.split()
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise AnnotationError(file, n, f"expected '<video> <0|1|2>', got {line!r}")
            if parts[1] == "0":
                continue
            path = Path(video_root) / cls / parts[0]
            if not path.exists() and (Path(video_root) / parts[0]).exists():
                path = Path(video_root) / parts[0]
            out["train" if parts[1] == "1" else "test"].append(VideoRecord(str(path), label))
    return out, names


def parse_ucf101(list_dir: Path, video_root: Path, split: int) -> tuple[dict[str, list[VideoRecord]], list[str]]:
    """UCF-101 `classInd.txt`, `trainlist0N.txt`, `testlist0N.txt` -> ({"train", "test"}, class names)."""
    list_dir = Path(list_dir)
    if split not in (1, 2, 3):
        raise ValueError(f"split: expected 1, 2 or 3, got {split}")
    names = read_class_names(list_dir / "classInd.txt")
    ids = {n: i for i, n in enumerate(names)}
    lower = {n.lower(): i for i, n in enumerate(names)}
    out: dict[str, list[VideoRecord]] = {"train": [], "test": []}
    for kind in ("train", "test"):
        file = list_dir / f"{kind}list{split:02d}.txt"
        for n, line in annotation_lines(file):
            parts = line.split()
            if len(parts) not in (1, 2):
                raise AnnotationError(file, n, f"expected '<class>/<video> [label]', got {line!r}")
            rel = parts[0]
            folder = rel.replace("\\", "/").split("/")[0] if "/" in rel.replace("\\", "/") else None
            folder_id = None if folder is None else ids.get(folder, lower.get(folder.lower()))
            if len(parts) == 2:
                try:
                    label = int(parts[1]) - 1  # classInd ids are 1-based
                except ValueError:
                    raise AnnotationError(file, n, f"label must be an integer, got {parts[1]!r}") from None
                if not 0 <= label < len(names):
                    raise AnnotationError(file, n, f"unknown class id {parts[1]}: expected 1..{len(names)}")
            elif folder_id is not None:
                label = folder_id
            else:
                raise AnnotationError(file, n, f"cannot tell the class of {rel!r} (no label, no known class folder)")
            out[kind].append(VideoRecord(str(Path(video_root) / rel), label))
    return out, names
