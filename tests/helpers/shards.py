"""A small writer of vmm shard sets (the format of docs/scale.md), for tests of the shard reader:
samples packed unchanged (`short_side 0`), so a shard's video decodes to the file's frames; and a
cut, a corrupt member, a served directory.

`write_shard_set(out, {"train": [(path, label), ...], ...}, classes, samples_per_shard=3)` writes
`out/meta.json` and `out/<split>/shard-%06d.tar`.
"""

from __future__ import annotations

import io
import json
import os
import signal
import tarfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from lightning.pytorch import Callback

__all__ = [
    "RecordTrainBatches",
    "SigtermAtStep",
    "cut_shard",
    "read_batches",
    "serve_directory",
    "write_shard_set",
]


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _sample_members(
    key: int, path: Path, label: int, classes: Sequence[str], data: bytes | None, window: tuple = ()
) -> list:
    name = f"{key:09d}"
    info = {
        "label": label,
        "class_name": classes[label] if 0 <= label < len(classes) else None,
        "video_id": key,
        "source": str(path),
        "num_frames": None,
        "fps": None,
        "duration": None,
        "width": None,
        "height": None,
    }
    if path.is_dir():
        frames = sorted(p for p in path.iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
        ext = frames[0].suffix.lower()[1:]
        info.update(kind="frames", member=ext, num_frames=len(frames))
        members = [(f"{name}.f{i:06d}.{ext}", f.read_bytes()) for i, f in enumerate(frames)]
    else:
        ext = path.suffix.lower()[1:]
        info.update(kind="video", member=ext)
        if window:
            info["start"], info["end"] = window
        members = [(f"{name}.{ext}", path.read_bytes() if data is None else data)]
    return [(f"{name}.json", json.dumps(info).encode("utf-8")), *members]


def write_shard_set(
    out: Path,
    splits: dict[str, Sequence[tuple]],
    classes: Sequence[str],
    samples_per_shard: int = 3,
    replace_data: dict[tuple[str, int], bytes] | None = None,
) -> dict:
    """Pack `splits` ({split: [(path, label) or (path, label, start, end), ...]}; start / end: the
    time window of an untrimmed video, in seconds) into shards of `samples_per_shard` samples;
    `replace_data[(split, key)]` stores those bytes as that sample's video member (a corrupt
    member). Returns the meta.json written."""
    out = Path(out)
    meta_splits = {}
    for split, entries in splits.items():
        (out / split).mkdir(parents=True, exist_ok=True)
        shards = []
        for s, first in enumerate(range(0, len(entries), samples_per_shard)):
            name = f"shard-{s:06d}.tar"
            chunk = entries[first : first + samples_per_shard]
            tmp = out / split / (name + ".tmp")
            with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
                for k, (path, label, *window) in enumerate(chunk):
                    key = first + k
                    data = (replace_data or {}).get((split, key))
                    for member, payload in _sample_members(key, Path(path), int(label), classes, data, tuple(window)):
                        _add(tar, member, payload)
            tmp.rename(out / split / name)
            shards.append(
                {
                    "name": name,
                    "num_samples": len(chunk),
                    "first_key": first,
                    "bytes": (out / split / name).stat().st_size,
                }
            )
        meta_splits[split] = {"num_samples": len(entries), "num_bad": 0, "bad": [], "shards": shards}
    meta = {
        "format": "vmm-shards",
        "format_version": 1,
        "layout": "shards",
        "vmm_version": "test",
        "created": "2026-01-01T00:00:00Z",
        "classes": list(classes),
        "source": {"datamodule": "tests.helpers.shards", "init_args": {}},
        "settings": {"short_side": 0, "codec": "copy", "gop": 0, "crf": 0, "shard_size_mb": 0.0},
        "splits": meta_splits,
    }
    (out / "meta.json").write_text(json.dumps(meta, indent=1), encoding="utf-8")
    return meta


def cut_shard(path: Path, inside: str) -> int:
    """Truncate the tar at `path` in the middle of the data of its member `inside` (as a partial
    download would); returns the new size."""
    with tarfile.open(path, "r:") as tar:
        info = tar.getmember(inside)
        size = info.offset_data + info.size // 2
    data = Path(path).read_bytes()
    Path(path).write_bytes(data[:size])
    return size


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:  # keep the test output clean
        pass


@contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """A real HTTP server (127.0.0.1, a free port, in a thread) serving `directory`; yields its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


class RecordTrainBatches(Callback):
    """Appends {"epoch", "batch", "ids"} of every training batch to the JSON-lines file `path`
    (a callback a `vmm fit` config names by class_path)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        line = {"epoch": trainer.current_epoch, "batch": batch_idx, "ids": batch["video_id"].tolist()}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line) + "\n")


class SigtermAtStep(Callback):
    """Sends this process a real SIGTERM when training reaches global step `step` (once)."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def read_batches(path: Path) -> list[dict]:
    """The records `RecordTrainBatches` wrote (none if the file does not exist)."""
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line]
