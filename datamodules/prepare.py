"""Prepare a dataset for scale: resized videos, as a tree of files or as WebDataset-style tar shards.

    prepare_dataset(dm, "/data/k400-320", short_side=320)           # shards of ~256 MB per split
    prepare_dataset(dm, "/data/k400-320", format="files")           # the same tree, resized
    prepare_dataset(dm, "/data/k400-raw", short_side=0)             # original bytes, packed

Every VideoDataModule works as the source (folders, lists, Kinetics CSVs, HMDB-51, UCF-101,
Something-Something, frame folders): its records per split, in their order, and its class names.

Output (the contract `datamodules/sharded.py` reads): `<output>/meta.json` (written last) and
`<output>/<split>/shard-%06d.tar`, plain POSIX (ustar) tars in WebDataset's convention: sample k
of a split (0-based, over the packed samples) has the key `%09d` and the members `<key>.json`
(label, class name, source path, kind, member extension, frames, fps, duration, size) and either
`<key>.mp4` (re-encoded), `<key>.<original extension>` (`short_side=0`: the bytes unchanged) or,
for a frame folder, its frames `<key>.f%06d.<ext>` numbered from 0 (bytes unchanged). A shard is
closed before the sample that would take it past `shard_size_mb` (MB = 10^6 bytes; a larger
sample gets a shard of its own). `format="files"` writes `<output>/<split>/<path relative to the
dataset root>` (extension .mp4 when re-encoded; frame folders keep their frame files) and lists
them, with each sample's metadata, in meta.json.

Re-encoding: the short side scaled to `short_side` (never up; both sides even, as 4:2:0 H.264
needs), H.264 from the first working encoder of `pick_encoder` (libx264 in PyAV's wheels), CRF
`DEFAULT_CRF`, preset `PRESET`, a keyframe at least every `DEFAULT_GOP` frames, audio dropped.
Every frame keeps its presentation time (relative to the first frame of the video, or of its time
window, which is all that is kept of an untrimmed video), so clips sampled by time are the same.

The keyframe interval: a random-access clip decodes from the keyframe before its first frame, so
its cost grows with the interval, while a shorter interval makes files larger. Against x264's
default (250), GOP 16 decodes training clips several times faster for a modest size increase;
GOP 8 buys little more speed for clearly more bytes, GOP 32 saves a few percent of the bytes for
clearly slower clips (figures: benchmarks/RESULTS.md, "Prepared videos: keyframe interval";
`benchmarks/bench_prepare.py`). Training reads are decode-bound, so 16 is the default (`gop`
changes it); CRF 23 and preset veryfast keep quality near the sources at a low encoding cost.

Bad videos follow `vmm check-data`: entries the listing already marks unusable (missing files,
dangling links, FIFOs) and videos that do not decode (re-encoding decodes every frame; with
`short_side=0` only the container is probed) are not packed; each is listed with its reason and
counted per split in meta.json (`bad`, `num_bad`) and in the returned dict. A split whose every
video is bad raises PrepareError after the other splits are done.

Parallel and resumable: `num_workers` processes decode and encode; the parent writes every shard
or file in record order, so the output is byte-identical for any worker count. A shard (or file)
is written atomically (`safe_io.atomic_writer`: a temporary `.<name>.*.tmp` in its own folder,
fsync-ed and renamed), then logged in `<output>/.prepare/<split>.jsonl`; a rerun with the same
settings deletes the temporaries of a killed run, skips what the log lists (and rewrites anything
missing or of another size); other settings raise PrepareError naming the setting. Shards are
written with the standard library's `tarfile` rather than `webdataset`'s TarWriter: the header
fields are fixed here (mtime 0, owner 0, mode 0644) so shards are reproducible, and preparing needs
no extra package (`pip install .[shards]` is for reading).
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import importlib.metadata
import inspect
import io
import json
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from .annotations import VideoRecord
from .base import SPLITS, VideoDataModule
from .decode import VideoDecodeError, VideoReader, build_index, output_size
from .encode import pick_encoder, x264_asm_option
from .frames import FrameRecord, frame_index, probe_frame_folder
from .safe_io import atomic_write_json, atomic_writer

__all__ = [
    "DEFAULT_CRF",
    "DEFAULT_GOP",
    "FORMAT",
    "FORMAT_VERSION",
    "LAYOUTS",
    "PRESET",
    "PrepareError",
    "check_meta",
    "even_size",
    "prepare_dataset",
    "read_meta",
    "reencode_video",
]

FORMAT = "vmm-shards"
FORMAT_VERSION = 1
LAYOUTS = ("shards", "files")
DEFAULT_GOP = 16
DEFAULT_CRF = 23
PRESET = "veryfast"
COPY_CODEC = "copy"  # settings["codec"] of short_side=0: the original bytes
_MB = 10**6
_BLOCK = tarfile.BLOCKSIZE
_STATE_DIR = ".prepare"


class PrepareError(ValueError):
    """The output cannot be (re)used as asked: other settings than an earlier run in the same
    folder, a folder that is not a prepared dataset, a split with no usable video, a bad meta.json."""


# -- per-video work (runs in the worker processes) ---------------------------------------------
@dataclass(frozen=True)
class _Job:
    short_side: int
    encoder: str
    gop: int
    crf: int


@dataclass
class _Sample:
    """What a worker found for one record: the sample's metadata and its members (extension,
    bytes or a file to copy), or why the record is bad."""

    info: dict | None = None
    members: list[tuple[str, bytes | str]] | None = None
    bad: str | None = None


def _process(args: tuple[VideoRecord, _Job]) -> _Sample:
    record, job = args
    if record.problem is not None:
        return _Sample(bad=record.problem)
    try:
        if isinstance(record, FrameRecord):
            return _frames(record)
        if job.short_side == 0:
            return _copy(record)
        return _reencode(record, job)
    except VideoDecodeError as exc:
        return _Sample(bad=exc.reason)
    except (av.FFmpegError, OSError) as exc:
        return _Sample(bad=f"{type(exc).__name__}: {exc}")


def _frames(record: FrameRecord) -> _Sample:
    """A frame folder: every frame checked by decoding (as check-data does), the files packed as they are."""
    probe = probe_frame_folder(record)
    index = frame_index(record.path, record.template, record.start_index, record.num_frames, record.offset)
    files = [index.file(i) for i in range(index.num_frames)]
    ext = _extension(files[0])
    info = _info("frames", ext, index.num_frames, None, None, probe["width"], probe["height"])
    return _Sample(info, [(f"f{i:06d}.{_extension(f)}", f) for i, f in enumerate(files)])


def _copy(record: VideoRecord) -> _Sample:
    """`short_side=0`: the original file, probed (demuxed, not decoded) for its frames and timing."""
    index = build_index(record.path).window(record.start, record.end)
    if index.num_frames == 0:
        raise VideoDecodeError(record.path, f"no frames in the time window [{record.start}, {record.end})")
    ext = _extension(record.path) or "video"
    info = _info("video", ext, index.num_frames, index.fps, index.duration, index.width, index.height)
    if record.start is not None or record.end is not None:
        # The bytes hold the whole untrimmed video: the reader needs the window.
        info["start"], info["end"] = record.start, record.end
    return _Sample(info, [(ext, record.path)])


def _reencode(record: VideoRecord, job: _Job) -> _Sample:
    """Decode every frame of the record (its time window only), scale it, encode H.264 into memory."""
    with VideoReader(record.path, threads=1) as reader:
        full = reader.index
        index = full.window(record.start, record.end)
        if index.num_frames == 0:
            raise VideoDecodeError(record.path, f"no frames in the time window [{record.start}, {record.end})")
        width, height = even_size(full.width, full.height, job.short_side)
        pos_of_pts = {int(p): i for i, p in enumerate(full.all_pts.tolist())}
        src = reader.stream
        rate = src.average_rate or src.guessed_rate or Fraction(max(1, round(index.fps)) if index.fps else 25)
        buf = io.BytesIO()
        kept = 0
        with av.open(buf, mode="w", format="mp4") as out:
            stream = out.add_stream(job.encoder, rate=Fraction(rate).limit_denominator(100000))
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            cc = stream.codec_context
            cc.thread_count = 1  # one encoder thread per worker process; also keeps x264 deterministic
            cc.time_base = full.time_base
            cc.gop_size = job.gop
            options = _encoder_options(job.encoder, job.crf)
            if options:
                stream.options = options
            reader.container.seek(0, backward=True, any_frame=False)
            last = -1
            try:
                for k, frame in enumerate(reader.container.decode(src)):
                    # pts-less or reordered-pts containers (AVI): the k-th frame out is the k-th in time.
                    pos = pos_of_pts.get(frame.pts) if full.pts_reliable else k
                    if pos is None or pos <= last or pos < index.lo:
                        continue
                    if pos >= index.lo + index.num_frames:
                        break
                    last = pos
                    scaled = frame.reformat(width=width, height=height, format="yuv420p", interpolation="AREA")
                    scaled.pts = int(full.all_pts[pos] - full.all_pts[index.lo])
                    scaled.time_base = full.time_base
                    for packet in stream.encode(scaled):
                        out.mux(packet)
                    kept += 1
            except av.FFmpegError as exc:
                raise VideoDecodeError(record.path, f"decoding failed after {kept} frames: {exc}") from None
            if kept < index.num_frames:
                raise VideoDecodeError(
                    record.path, f"only {kept} of {index.num_frames} indexed frames decode (truncated?)"
                )
            for packet in stream.encode(None):
                out.mux(packet)
    info = _info("video", "mp4", index.num_frames, index.fps, index.duration, width, height)
    return _Sample(info, [("mp4", buf.getvalue())])


def reencode_video(
    record: VideoRecord | str | os.PathLike,
    short_side: int,
    *,
    gop: int = DEFAULT_GOP,
    crf: int = DEFAULT_CRF,
    encoder: str | None = None,
) -> tuple[bytes, dict]:
    """One video (a path, or a record with its time window) re-encoded as `prepare_dataset` does:
    (the MP4 file's bytes, its {"kind", "member", "num_frames", "fps", "duration", "width",
    "height"}). Raises VideoDecodeError for a video that does not decode."""
    if not isinstance(record, VideoRecord):
        record = VideoRecord(str(record), -1)
    sample = _reencode(record, _Job(short_side, encoder or pick_encoder(), gop, crf))
    return sample.members[0][1], sample.info


def even_size(width: int, height: int, short_side: int) -> tuple[int, int]:
    """(width, height) of a video re-encoded at `short_side`: the short side scaled to it, never
    up, the aspect ratio kept, odd sides rounded down to even numbers (4:2:0 chroma needs them)."""
    if short_side > 0 and min(width, height) > short_side:
        width, height = output_size(width, height, short_side)
    return max(2, width - width % 2), max(2, height - height % 2)


def _encoder_options(encoder: str, crf: int) -> dict[str, str]:
    if encoder == "libx264":
        return {"crf": str(crf), "preset": PRESET, **x264_asm_option()}
    if encoder == "mpeg4":
        return {"qscale": "3"}
    return {}


def _extension(path: str) -> str:
    return os.path.splitext(path)[1][1:].lower()


def _info(kind, member, num_frames, fps, duration, width, height) -> dict:
    return {
        "kind": kind,
        "member": member,
        "num_frames": int(num_frames),
        "fps": None if fps is None else float(fps),
        "duration": None if duration is None else float(duration),
        "width": int(width),
        "height": int(height),
    }


# -- writing (the parent process) -----------------------------------------------------------------
def _sample_json(key: int, record: VideoRecord, info: dict, class_names: Sequence[str]) -> dict:
    name = class_names[record.label] if 0 <= record.label < len(class_names) else None
    sample = {"label": int(record.label), "class_name": name, "video_id": key, "source": record.path}
    sample.update(info)
    return sample


def _sample_json_bytes(sample_json: dict) -> bytes:
    return json.dumps(sample_json, ensure_ascii=False).encode("utf-8")


def _tar_size(sample: _Sample, json_bytes: int) -> int:
    """Bytes the sample takes in a tar: a header block per member, data padded to whole blocks."""
    sizes = [json_bytes] + [len(m) if isinstance(m, bytes) else os.path.getsize(m) for _, m in sample.members]
    return sum(_BLOCK + -(-s // _BLOCK) * _BLOCK for s in sizes)


def _shard_file_size(member_bytes: int) -> int:
    """Size of a tar holding `member_bytes` of headers and data: two zero blocks end it, and
    tarfile pads the file to a whole record (20 blocks)."""
    return -(-(member_bytes + 2 * _BLOCK) // tarfile.RECORDSIZE) * tarfile.RECORDSIZE


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid = size, 0, 0o644, 0, 0
    info.uname = info.gname = ""
    return info


def _write_shard(path: Path, samples: list[tuple[int, dict, _Sample]]) -> int:
    """Write the shard atomically (`safe_io.atomic_writer`); returns its size in bytes."""
    with atomic_writer(path, "wb") as fh:
        with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for key, sample_json, sample in samples:
                data = _sample_json_bytes(sample_json)
                tar.addfile(_tarinfo(f"{key:09d}.json", len(data)), io.BytesIO(data))
                for ext, content in sample.members:
                    name = f"{key:09d}.{ext}"
                    if isinstance(content, bytes):
                        tar.addfile(_tarinfo(name, len(content)), io.BytesIO(content))
                    else:
                        with open(content, "rb") as src:
                            tar.addfile(_tarinfo(name, os.fstat(src.fileno()).st_size), src)
    return path.stat().st_size


def _write_file(path: Path, content: bytes | str) -> None:
    """One output file (re-encoded bytes, or a copy of a source file), written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_writer(path, "wb") as fh:
        if isinstance(content, bytes):
            fh.write(content)
        else:
            with open(content, "rb") as src:
                shutil.copyfileobj(src, fh, 1 << 20)


# -- the progress log -----------------------------------------------------------------------------
class _Log:
    """`<output>/.prepare/<split>.jsonl`: a header line (what the split lists), then one line per
    finished shard or file, appended (and fsync-ed) after the rename. A torn last line is ignored."""

    def __init__(self, path: Path, header: dict):
        self.path, self.header = path, header

    def entries(self) -> list[dict]:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return []
        parsed = []
        for line in lines:
            try:
                parsed.append(json.loads(line))
            except json.JSONDecodeError:
                break
        if not parsed:
            return []
        if parsed[0] != self.header:
            raise PrepareError(
                f"output: {self.path.parent.parent} holds the {self.header['split']!r} split of another source "
                f"({parsed[0].get('records')} records listed then, {self.header['records']} now, or other paths "
                "or labels); prepare into a new folder"
            )
        return parsed[1:]

    def rewrite(self, entries: list[dict]) -> None:
        with atomic_writer(self.path, "w") as fh:
            for entry in [self.header, *entries]:
                fh.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def append(self, entry: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(entry, ensure_ascii=False) + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def _records_digest(records: Sequence[VideoRecord]) -> str:
    h = hashlib.sha256()
    for r in records:
        h.update(json.dumps([r.path, r.label, r.start, r.end, type(r).__name__], ensure_ascii=False).encode("utf-8"))
    return h.hexdigest()


# -- progress bar ----------------------------------------------------------------------------------
class _TextBar:
    """A plain progress bar on stderr (used when tqdm is missing)."""

    def __init__(self, total: int, initial: int, desc: str):
        self.total, self.n, self.desc, self._shown = total, initial, desc, 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._shown > 0.5 or self.n >= self.total:
            self._shown = now
            done = int(30 * self.n / max(1, self.total))
            print(f"\r{self.desc} [{'#' * done}{'.' * (30 - done)}] {self.n}/{self.total}", end="", file=sys.stderr)

    def close(self) -> None:
        print(file=sys.stderr)


def _bar(total: int, initial: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return _TextBar(total, initial, desc)
    return tqdm(total=total, initial=initial, desc=desc, unit="video", file=sys.stderr, dynamic_ncols=True)


# -- the driver ------------------------------------------------------------------------------------
def prepare_dataset(
    dm: VideoDataModule,
    output: str | os.PathLike,
    *,
    format: str = "shards",
    short_side: int = 320,
    shard_size_mb: float = 256.0,
    num_workers: int | None = None,
    splits: Sequence[str] | None = None,
    progress: bool = True,
    source_config: dict | None = None,
    gop: int = DEFAULT_GOP,
    crf: int = DEFAULT_CRF,
) -> dict:
    """Write `dm`'s videos to `output` as tar shards (`format="shards"`) or files (`"files"`);
    returns the meta dict written to `<output>/meta.json` (module docstring: layout and policy).

    `short_side`: even pixels of the re-encoded short side, 0 to pack the original bytes.
    `num_workers`: processes that decode and encode (None: min(cpus, 8); 0: this process).
    `splits`: of "train", "val", "test" (None: every split the layout has; a split that only falls
    back to another, as "val" to "test" without a val list, is not written twice).
    `source_config`: the datamodule's {"class_path", "init_args"} for meta.json (default: its class
    and the constructor arguments found on it). `gop` / `crf`: keyframe interval and x264 CRF.
    Raises ValueError naming the argument for a bad one, PrepareError for an output that cannot be
    resumed or a split whose every video is bad.
    """
    if not isinstance(dm, VideoDataModule):
        raise TypeError(f"dm: expected a datamodules.VideoDataModule, got {type(dm).__name__}")
    if format not in LAYOUTS:
        raise ValueError(f"format: expected one of {LAYOUTS}, got {format!r}")
    if isinstance(short_side, bool) or not isinstance(short_side, int) or short_side < 0 or short_side % 2:
        raise ValueError(f"short_side: expected 0 (original bytes) or an even number of pixels > 0, got {short_side!r}")
    if not isinstance(shard_size_mb, (int, float)) or isinstance(shard_size_mb, bool) or not shard_size_mb > 0:
        raise ValueError(f"shard_size_mb: expected a number > 0, got {shard_size_mb!r}")
    if num_workers is not None and (not isinstance(num_workers, int) or num_workers < 0):
        raise ValueError(f"num_workers: expected None or an integer >= 0, got {num_workers!r}")
    if not isinstance(gop, int) or gop < 1:
        raise ValueError(f"gop: expected an integer >= 1, got {gop!r}")
    if not isinstance(crf, int) or not 0 <= crf <= 51:
        raise ValueError(f"crf: expected an integer in [0, 51], got {crf!r}")
    if source_config is not None and not (isinstance(source_config, dict) and "class_path" in source_config):
        raise ValueError(f"source_config: expected a dict with 'class_path' (and 'init_args'), got {source_config!r}")
    root = Path(output).expanduser()
    if root.exists() and not root.is_dir():
        raise ValueError(f"output: expected a folder (new or prepared before), got the existing file {str(root)!r}")
    if hasattr(dm, "prepare_data"):
        dm.prepare_data()
    chosen = _choose_splits(dm, splits)
    workers = min(os.cpu_count() or 1, 8) if num_workers is None else num_workers

    encoder = pick_encoder() if short_side > 0 else COPY_CODEC
    settings = {
        "short_side": short_side,
        "codec": encoder,
        "gop": gop,
        "crf": crf,
        "shard_size_mb": float(shard_size_mb),
    }
    state = root / _STATE_DIR
    _claim_output(root, state, {"layout": format, "format_version": FORMAT_VERSION, **settings})
    with _locked(state):
        job = _Job(short_side, encoder, gop, crf)
        class_names = dm.class_names
        summaries: dict[str, dict] = {}
        pool = _pool(workers)
        try:
            for split in chosen:
                summaries[split] = _prepare_split(
                    dm, split, root, state, format, job, float(shard_size_mb), class_names, pool, progress
                )
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        empty = {s: v for s, v in summaries.items() if v["num_samples"] == 0}
        if empty:
            parts = []
            for split, v in empty.items():
                shown = "; ".join(f"{p}: {why}" for p, why in v["bad"][:3]) + ("; ..." if v["num_bad"] > 3 else "")
                parts.append(
                    f"split {split!r}: all {v['num_bad']} videos are bad ({shown})"
                    if v["num_bad"]
                    else f"split {split!r}: lists no videos"
                )
            raise PrepareError(
                "nothing to pack: " + "; ".join(parts) + ". Fix or remove them (vmm check-data lists every bad "
                "video), or leave the split out (splits=...); meta.json was not written"
            )
        meta = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "layout": format,
            "vmm_version": _vmm_version(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "classes": list(class_names),
            "source": _source(dm, source_config),
            "settings": settings,
            "splits": _previous_splits(root, format, settings, chosen) | summaries,
        }
        atomic_write_json(root / "meta.json", meta)
    return meta


def _choose_splits(dm: VideoDataModule, splits: Sequence[str] | None) -> list[str]:
    present = [s for s in SPLITS if dm.has_split(s)]
    if splits is None:
        chosen = list(present)
        if "val" in chosen and "test" in chosen:
            val, test = dm.records("val"), dm.records("test")
            # records("val") returns the test list itself when the layout has no val list; a
            # test split that falls back to val is an equal, separate list.
            if val is test:
                chosen.remove("val")
            elif val == test:
                chosen.remove("test")
        if not chosen:
            raise ValueError(f"dm: {type(dm).__name__} has no train, val or test split")
        return chosen
    if isinstance(splits, str) or not splits:
        raise ValueError(f"splits: expected a non-empty list of split names from {SPLITS}, got {splits!r}")
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"splits: expected names from {SPLITS}, got {s!r}")
        if s not in present:
            raise ValueError(f"splits: {type(dm).__name__} has no {s!r} split (it has: {', '.join(present) or 'none'})")
    return list(dict.fromkeys(splits))


def _claim_output(root: Path, state: Path, settings: dict) -> None:
    """Check `root` is new, empty, or prepared before with these settings; record them."""
    file = state / "settings.json"
    if file.is_file():
        before = json.loads(file.read_text(encoding="utf-8"))
        for name, value in settings.items():
            if before.get(name) != value:
                arg = {"layout": "format", "format_version": "format_version"}.get(name, name)
                raise PrepareError(
                    f"{arg}: {root} was prepared with {name}={before.get(name)!r}, this run asks for "
                    f"{name}={value!r}; rerun with the same settings to resume, or prepare into a new folder"
                )
        return
    if root.is_dir() and any(p.name != _STATE_DIR for p in root.iterdir()):
        raise PrepareError(
            f"output: {root} is a non-empty folder that vmm prepare did not write (no {_STATE_DIR}/settings.json); "
            "expected a new or empty folder, or one prepared before"
        )
    state.mkdir(parents=True, exist_ok=True)
    atomic_write_json(file, settings)


@contextlib.contextmanager
def _locked(state: Path) -> Iterator[None]:
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except OSError:
            raise PrepareError(f"output: another prepare run is writing to {state.parent}") from None
        yield
    finally:
        os.close(fd)


def _pool(workers: int):
    if workers == 0:
        return None
    ctx = multiprocessing.get_context("fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn")
    return ctx.Pool(workers)


def _results(pool, records: Sequence[VideoRecord], job: _Job) -> Iterable[_Sample]:
    tasks = ((r, job) for r in records)
    if pool is None:
        return map(_process, tasks)
    return pool.imap(_process, tasks, chunksize=1)  # in record order, whatever finishes first


def _prepare_split(dm, split, root, state, layout, job, shard_size_mb, class_names, pool, progress) -> dict:
    records = dm.records(split)
    log = _Log(state / f"{split}.jsonl", {"split": split, "records": len(records), "digest": _records_digest(records)})
    out_dir = root / split
    out_dir.mkdir(parents=True, exist_ok=True)
    resuming = log.path.exists()
    entries = _verified(log.entries(), out_dir, layout)
    log.rewrite(entries)
    start = entries[-1]["record_end"] if entries else 0
    next_key = sum(e["num_samples"] for e in entries)
    if resuming:  # temporaries of a killed run (this run holds the lock: none is live)
        for tmp in out_dir.glob("*.tmp") if layout == "shards" else out_dir.rglob("*.tmp"):
            tmp.unlink(missing_ok=True)
    bar = _bar(len(records), start, f"prepare {split}", progress and start < len(records))
    bad: list[list[str]] = []
    current: list[tuple[int, dict, _Sample]] = []
    current_bytes, unit_start = 0, start
    limit = shard_size_mb * _MB
    # files layout: output name -> the record written there (two sources may map to one name)
    taken = {e["file"]: (e["sample"]["source"], e.get("window")) for e in entries if e.get("file")}

    def close_shard(record_end: int) -> None:
        nonlocal current, current_bytes, unit_start, bad
        number = len([e for e in entries if e.get("shard")])
        name = f"shard-{number:06d}.tar"
        size = _write_shard(out_dir / name, current) if current else 0
        shard = (
            {"name": name, "num_samples": len(current), "first_key": current[0][0], "bytes": size} if current else None
        )
        entry = {"record_start": unit_start, "record_end": record_end, "num_samples": len(current), "bad": bad}
        entry["shard"] = shard
        log.append(entry)
        entries.append(entry)
        current, current_bytes, unit_start, bad = [], 0, record_end, []

    try:
        for i, sample in enumerate(_results(pool, records[start:], job), start):
            record = records[i]
            if sample.bad is not None:
                bad.append([record.path, sample.bad])
            elif layout == "files":
                rel = _output_name(dm, record, job)
                window = [record.start, record.end] if record.start is not None or record.end is not None else None
                if taken.get(rel, (record.path, window)) != (record.path, window):
                    stem, dot, ext = rel.rpartition(".") if "." in Path(rel).name else (rel, "", "")
                    rel = f"{stem}-{next_key:09d}{dot}{ext}"
                taken[rel] = (record.path, window)
                _write_files(out_dir / rel, sample)
                entry = {
                    "record_start": unit_start,
                    "record_end": i + 1,
                    "num_samples": 1,
                    "bad": bad,
                    "file": rel,
                    "window": window,
                    "sample": _sample_json(next_key, record, _files_info(record, sample.info), class_names),
                }
                log.append(entry)
                entries.append(entry)
                next_key += 1
                bad, unit_start = [], i + 1
            else:
                sample_json = _sample_json(next_key, record, sample.info, class_names)
                size = _tar_size(sample, len(_sample_json_bytes(sample_json)))
                if current and _shard_file_size(current_bytes + size) > limit:
                    close_shard(i)
                current.append((next_key, sample_json, sample))
                current_bytes += size
                next_key += 1
            if bar is not None:
                bar.update(1)
        if current or bad or unit_start < len(records):
            if layout == "shards":
                close_shard(len(records))
            else:
                entry = {"record_start": unit_start, "record_end": len(records), "num_samples": 0, "bad": bad}
                log.append(entry)
                entries.append(entry)
    finally:
        if bar is not None:
            bar.close()
    return _summary(entries, layout, out_dir)


def _verified(entries: list[dict], out_dir: Path, layout: str) -> list[dict]:
    """The logged entries up to the first whose output is missing or changed (redone from there)."""
    kept, end = [], 0
    for e in entries:
        if e.get("record_start") != end:
            break
        if e.get("shard"):
            f = out_dir / e["shard"]["name"]
            if not f.is_file() or f.stat().st_size != e["shard"]["bytes"]:
                break
        if e.get("file") and not (out_dir / e["file"]).exists():
            break
        kept.append(e)
        end = e["record_end"]
    return kept


def _summary(entries: list[dict], layout: str, out_dir: Path) -> dict:
    bad = [b for e in entries for b in e["bad"]]
    summary = {"num_samples": sum(e["num_samples"] for e in entries), "num_bad": len(bad), "bad": bad}
    if layout == "shards":
        summary["shards"] = [e["shard"] for e in entries if e.get("shard")]
        names = {s["name"] for s in summary["shards"]}
        for f in out_dir.glob("shard-*.tar"):  # of a run cut short before its log line
            if f.name not in names:
                f.unlink()
    else:
        summary["files"] = [e["file"] for e in entries if e.get("file")]
        summary["samples"] = [e["sample"] for e in entries if e.get("file")]
    return summary


def _previous_splits(root: Path, layout: str, settings: dict, chosen: Sequence[str]) -> dict:
    """Splits of an earlier run into this output (same settings) that this run did not redo."""
    try:
        meta = read_meta(root)
    except (PrepareError, FileNotFoundError):
        return {}
    if meta["layout"] != layout or meta["settings"] != settings:
        return {}
    return {s: v for s, v in meta["splits"].items() if s not in chosen}


def _files_info(record: VideoRecord, info: dict) -> dict:
    if isinstance(record, FrameRecord):
        # The frame files keep their names: the reader needs the template to find them.
        return {**info, "template": record.template, "start_index": record.start_index + record.offset}
    return info


def _output_name(dm: VideoDataModule, record: VideoRecord, job: _Job) -> str:
    """`<path relative to the dataset root>` (.mp4 when re-encoded; the time window in the name of
    a trimmed part of an untrimmed video)."""
    path = Path(os.path.abspath(record.path))
    rel = None
    for attr in ("video_dir", "root"):
        base = getattr(dm, attr, None)
        if base is not None:
            with contextlib.suppress(ValueError):
                rel = path.relative_to(os.path.abspath(base))
                break
    if rel is None:
        rel = Path(path.parent.name) / path.name
    if job.short_side > 0 and not isinstance(record, FrameRecord):
        rel = rel.with_suffix(".mp4") if rel.suffix.lower() != ".mp4" else rel
        if record.start is not None or record.end is not None:
            rel = rel.with_name(
                f"{rel.stem}_{record.start or 0:g}-{record.end if record.end is not None else 'end'}.mp4"
            )
    return rel.as_posix()


def _write_files(target: Path, sample: _Sample) -> None:
    if sample.info["kind"] == "frames":
        target.mkdir(parents=True, exist_ok=True)
        for _, src in sample.members:
            _write_file(target / os.path.basename(src), src)
        return
    [(_, content)] = sample.members
    _write_file(target, content)


def _source(dm: VideoDataModule, source_config: dict | None) -> dict:
    if source_config is not None:
        return {"datamodule": source_config["class_path"], "init_args": dict(source_config.get("init_args") or {})}
    cls = type(dm)
    args = {}
    for name in inspect.signature(cls.__init__).parameters:
        value = getattr(dm, name, None)
        if isinstance(value, Path):
            value = str(value)
        if isinstance(value, (str, int, float, bool)) or (
            isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float)) for v in value)
        ):
            args[name] = list(value) if isinstance(value, tuple) else value
    return {"datamodule": f"{cls.__module__}.{cls.__qualname__}", "init_args": args}


def _vmm_version() -> str:
    try:
        return importlib.metadata.version("video-motion-modules")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# -- reading meta.json -----------------------------------------------------------------------------
def read_meta(root: str | os.PathLike) -> dict:
    """`<root>/meta.json` of a prepared dataset, checked by `check_meta`. FileNotFoundError when there
    is none (not prepared, or not finished); PrepareError naming the file and the field for a
    malformed one."""
    file = Path(root).expanduser() / "meta.json"
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise PrepareError(f"{file}: not valid JSON ({exc})") from None
    return check_meta(meta, str(file))


def check_meta(meta: object, source: str, *, layout: str | None = None, error: type[Exception] = PrepareError) -> dict:
    """`meta` (a parsed meta.json) checked field by field: format, version, layout (`layout` when
    given), classes, settings, and each split's counts with its shard entries (name, first_key,
    num_samples) or files. Raises `error("<source>: <field>: <what>")` at the first wrong field; the
    one checker of the file for whoever reads it (the prepare run resuming, the sharded datamodule)."""

    def need(cond: bool, what: str) -> None:
        if not cond:
            raise error(f"{source}: {what}")

    need(isinstance(meta, dict), "expected a JSON object")
    need(
        meta.get("format") == FORMAT,
        f"format: expected {FORMAT!r} (the output of vmm prepare), got {meta.get('format')!r}",
    )
    need(
        meta.get("format_version") == FORMAT_VERSION,
        f"format_version: expected {FORMAT_VERSION}, got {meta.get('format_version')!r} (written by another vmm)",
    )
    need(meta.get("layout") in LAYOUTS, f"layout: expected one of {LAYOUTS}, got {meta.get('layout')!r}")
    if layout is not None:
        need(
            meta["layout"] == layout,
            f"layout: expected {layout!r} (vmm prepare --format {layout}), got {meta['layout']!r}",
        )
    need(
        isinstance(meta.get("classes"), list) and all(isinstance(c, str) for c in meta["classes"]),
        "classes: expected a list of class names",
    )
    settings = meta.get("settings")
    need(isinstance(settings, dict), "settings: expected an object")
    for name in ("short_side", "codec", "gop", "crf", "shard_size_mb"):
        need(name in settings, f"settings.{name}: missing")
    splits = meta.get("splits")
    need(isinstance(splits, dict) and splits, "splits: expected an object with at least one split")
    listing = "shards" if meta["layout"] == "shards" else "files"
    for split, info in splits.items():
        need(split in SPLITS, f"splits: expected names from {SPLITS}, got {split!r}")
        need(isinstance(info, dict), f"splits.{split}: expected an object")
        for name in ("num_samples", "num_bad", "bad", listing):
            need(name in info, f"splits.{split}.{name}: missing")
        need(isinstance(info[listing], list), f"splits.{split}.{listing}: expected a list")
        if listing == "shards":
            for i, shard in enumerate(info["shards"]):
                need(
                    isinstance(shard, dict)
                    and isinstance(shard.get("name"), str)
                    and all(type(shard.get(k)) is int and shard[k] >= 0 for k in ("first_key", "num_samples")),
                    f"splits.{split}.shards[{i}]: expected a name and non-negative integers first_key and "
                    f"num_samples, got {shard!r}",
                )
            counted = sum(s["num_samples"] for s in info["shards"])
            need(
                counted == info["num_samples"],
                f"splits.{split}: shards hold {counted} samples, not {info['num_samples']}",
            )
        else:
            need(
                len(info["files"]) == info["num_samples"],
                f"splits.{split}: {len(info['files'])} files, not {info['num_samples']}",
            )
    return meta
