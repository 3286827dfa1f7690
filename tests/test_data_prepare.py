"""datamodules.prepare: datasets packed into tar shards (or resized files) that decode like the sources.

Real parts only: clips encoded here by PyAV (datamodules.encode.write_video), the shared real
clips (skipped without them), JPEG/PNG frame folders; shards read back with the standard
library's tarfile and decoded by vmm's VideoReader.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import REPO_ROOT
from helpers.frames import write_jpeg_folder
from PIL import Image

from datamodules import (
    KineticsDataModule,
    PrepareError,
    RawFrameListDataModule,
    ShardedVideoDataModule,
    VideoFolderDataModule,
    VideoListDataModule,
    VideoReader,
    build_index,
    check_meta,
    prepare_dataset,
    read_meta,
)
from datamodules.encode import write_video

SAMPLE_KEYS = {"label", "class_name", "video_id", "source", "kind", "member", "num_frames", "fps", "duration"}
SAMPLE_KEYS |= {"width", "height"}


def _clip(path: Path, seed: int, frames: int = 12, size: tuple[int, int] = (64, 48), fps: int = 10) -> Path:
    """A small real H.264 file: a textured square moving over noise (content differs by seed)."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    video = np.repeat(base[None], frames, axis=0)
    for t in range(frames):
        x = (3 * t + seed) % (w - 16)
        video[t, 8:24, x : x + 16] = 255 - 20 * (seed % 5)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_video(path, video, fps=fps, crf=18)
    return path


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory) -> Path:
    """`root/{train,test}/<class>/<video>.mp4`: 5 train videos (one of them corrupt), 2 test videos."""
    root = tmp_path_factory.mktemp("folder")
    for k, (cls, name) in enumerate([("cat", "a"), ("cat", "b"), ("dog", "c"), ("dog", "d")]):
        _clip(root / "train" / cls / f"{name}.mp4", k, size=(64, 48) if k % 2 else (48, 64))
    (root / "train" / "dog" / "e_corrupt.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + os.urandom(300))
    for k, cls in enumerate(["cat", "dog"]):
        _clip(root / "test" / cls / f"t{k}.mp4", 10 + k, frames=9)
    return root


def _members(shard: Path) -> dict[str, bytes]:
    with tarfile.open(shard) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def _samples(root: Path, split: str) -> dict[int, dict[str, bytes]]:
    """{key: {extension: bytes}} over every shard of `split`, checking member order and naming."""
    out: dict[int, dict[str, bytes]] = {}
    for shard in sorted((root / split).glob("shard-*.tar")):
        keys = []
        for name, data in _members(shard).items():
            key, _, ext = name.partition(".")
            assert len(key) == 9 and key.isdigit(), name
            if not keys or keys[-1] != int(key):
                keys.append(int(key))
            out.setdefault(int(key), {})[ext] = data
        assert keys == sorted(keys)
    assert list(out) == list(range(len(out)))  # consecutive keys over the packed samples
    return out


def _decoded_file(data: bytes, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _shard_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("*/shard-*.tar"))}


def test_shards_of_a_folder_layout(folder_root, tmp_path):
    dm = VideoFolderDataModule(root=str(folder_root))
    out = tmp_path / "shards"
    meta = prepare_dataset(dm, out, short_side=32, shard_size_mb=0.021, num_workers=0, progress=False)

    assert read_meta(out) == json.loads((out / "meta.json").read_text(encoding="utf-8")) == meta
    assert meta["format"] == "vmm-shards" and meta["format_version"] == 1 and meta["layout"] == "shards"
    assert meta["classes"] == ["cat", "dog"]
    assert meta["source"]["datamodule"] == "datamodules.layouts.VideoFolderDataModule"
    assert meta["source"]["init_args"]["root"] == str(folder_root)
    assert meta["settings"]["short_side"] == 32 and meta["settings"]["codec"] == "libx264"
    # no val/ folder: validation falls back to test, which is written once
    assert set(meta["splits"]) == {"train", "test"}
    train = meta["splits"]["train"]
    assert train["num_samples"] == 4 and train["num_bad"] == 1
    [(bad_path, reason)] = train["bad"]
    assert bad_path.endswith("e_corrupt.mp4") and reason
    assert len(train["shards"]) >= 2  # shard_size_mb forces several
    assert any(s["num_samples"] > 1 for s in train["shards"])
    assert [s["first_key"] for s in train["shards"]] == np.cumsum([0] + [s["num_samples"] for s in train["shards"]])[
        :-1
    ].tolist()
    for s in train["shards"]:
        assert (out / "train" / s["name"]).stat().st_size == s["bytes"]
        assert s["bytes"] <= 21_000 or s["num_samples"] == 1  # shard_size_mb in 10^6 bytes, a bound
    assert not list(out.rglob("*.tmp"))

    samples = _samples(out, "train")
    records = [r for r in dm.records("train") if not r.path.endswith("e_corrupt.mp4")]
    for key, members in samples.items():
        assert set(members) == {"json", "mp4"}
        info = json.loads(members["json"].decode("utf-8"))
        assert set(info) == SAMPLE_KEYS
        assert info["video_id"] == key and info["source"] == records[key].path and info["kind"] == "video"
        assert info["label"] == records[key].label and info["class_name"] == meta["classes"][info["label"]]
        src = build_index(records[key].path)
        path = _decoded_file(members["mp4"], tmp_path, f"{key}.mp4")
        with VideoReader(path) as reader:
            index = reader.index
            assert min(index.width, index.height) == 32 and index.width % 2 == 0 and index.height % 2 == 0
            assert (index.width > index.height) == (src.width > src.height)
            assert index.num_frames == src.num_frames == info["num_frames"]
            np.testing.assert_allclose(
                index.times(range(index.num_frames)), src.times(range(src.num_frames)), atol=1e-3
            )
            assert info["fps"] == pytest.approx(10.0) and index.fps == pytest.approx(10.0)
            clip = reader.decode([0, index.num_frames - 1])
            assert clip.shape == (2, index.height, index.width, 3)
        assert (info["width"], info["height"]) == (index.width, index.height)


def test_short_side_zero_packs_the_original_bytes(shared_videos, tmp_path):
    names = ["kinetics_arm_wrestling.mp4", "mpeg4_320x240.avi"]
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{shared_videos / n} {i}\n" for i, n in enumerate(names)), encoding="utf-8")
    dm = VideoListDataModule(root=str(tmp_path), train_list=str(listing), class_names=["wrestling", "other"])
    out = tmp_path / "raw"
    meta = prepare_dataset(dm, out, short_side=0, num_workers=0, progress=False)
    assert meta["settings"]["codec"] == "copy"
    samples = _samples(out, "train")
    assert [set(m) for m in samples.values()] == [{"json", "mp4"}, {"json", "avi"}]
    for key, name in enumerate(names):
        info = json.loads(samples[key]["json"])
        ext = info["member"]
        assert samples[key][ext] == (shared_videos / name).read_bytes()
        index = build_index(shared_videos / name)
        assert info["num_frames"] == index.num_frames and info["fps"] == pytest.approx(index.fps)
        assert (info["width"], info["height"]) == (index.width, index.height)
        assert info["class_name"] == ["wrestling", "other"][key]


def test_real_clips_reencoded_keep_frames_and_timing(shared_videos, tmp_path):
    names = ["h264_340x256.mp4", "mpeg4_320x240.avi"]  # the AVI's demuxer reorders pts (B-frames)
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{shared_videos / n} 0\n" for n in names), encoding="utf-8")
    dm = VideoListDataModule(root=str(tmp_path), train_list=str(listing))
    out = tmp_path / "small"
    prepare_dataset(dm, out, short_side=128, num_workers=2, progress=False)
    for key, (name, members) in enumerate(zip(names, _samples(out, "train").values(), strict=True)):
        src = build_index(shared_videos / name)
        with VideoReader(_decoded_file(members["mp4"], tmp_path, f"{key}.mp4")) as reader:
            index = reader.index
            assert index.height == 128 and index.width == 2 * round(src.width * 128 / src.height / 2)
            assert index.num_frames == src.num_frames
            assert index.fps == pytest.approx(src.fps, rel=1e-3)
            # every frame at its source time, within a frame
            assert np.abs(index.times(range(index.num_frames)) - src.times(range(src.num_frames))).max() < 1 / src.fps
            # a keyframe at least every 16 frames: random access stays cheap
            assert np.diff(np.searchsorted(index.pts, index.keyframe_pts)).max() <= 16
            frames = reader.decode([5, 100])
        with VideoReader(shared_videos / name) as original:
            want = original.decode([5, 100], short_side=128)
        # the same pictures (the source scaled to 128 rounds its long side to 171 where ours is even)
        assert np.abs(frames.astype(int) - want[:, :, : index.width].astype(int)).mean() < 8


def test_frame_folders_are_packed_unchanged(tmp_path):
    frames = [np.full((24, 32, 3), 40 * i, np.uint8) for i in range(5)]
    jpeg = write_jpeg_folder(tmp_path / "frames" / "v0", frames)
    broken = write_jpeg_folder(tmp_path / "frames" / "v1", frames[:2])
    (broken / "img_00002.jpg").write_bytes(b"not a jpeg")
    png = tmp_path / "frames" / "v2"
    png.mkdir()
    for i, f in enumerate(frames[:3]):
        Image.fromarray(f).save(png / f"{i:04d}.png")
    jpeg_list, png_list = tmp_path / "jpeg.txt", tmp_path / "png.txt"
    jpeg_list.write_text("frames/v0 5 0\nframes/v1 2 1\n", encoding="utf-8")
    png_list.write_text("frames/v2 3 1\n", encoding="utf-8")
    cases = [
        (
            RawFrameListDataModule(root=str(tmp_path), train_list=str(jpeg_list), num_classes=2),
            jpeg,
            "img_{:05d}.jpg",
            1,
        ),
        (
            RawFrameListDataModule(
                root=str(tmp_path),
                train_list=str(png_list),
                num_classes=2,
                frame_template="{:04d}.png",
                frame_start_index=0,
            ),
            png,
            "{:04d}.png",
            0,
        ),
    ]
    for n, (dm, folder, template, start) in enumerate(cases):
        meta = prepare_dataset(dm, tmp_path / f"packed{n}", short_side=64, num_workers=0, progress=False)
        info = json.loads(_samples(tmp_path / f"packed{n}", "train")[0]["json"])
        members = _samples(tmp_path / f"packed{n}", "train")[0]
        ext, count = template.rpartition(".")[2], len(list(folder.iterdir()))
        assert info["kind"] == "frames" and info["member"] == ext and info["num_frames"] == count
        assert info["fps"] is None and (info["width"], info["height"]) == (32, 24)
        assert set(members) == {"json", *(f"f{i:06d}.{ext}" for i in range(count))}
        for i in range(count):
            assert members[f"f{i:06d}.{ext}"] == (folder / template.format(start + i)).read_bytes()
    bad = read_meta(tmp_path / "packed0")["splits"]["train"]
    assert bad["num_bad"] == 1 and bad["bad"][0][0].endswith("v1") and "unreadable frame" in bad["bad"][0][1]
    assert meta["splits"]["train"]["num_samples"] == 1


def test_output_is_the_same_for_any_worker_count(folder_root, tmp_path):
    dm = VideoFolderDataModule(root=str(folder_root))
    kw = {"short_side": 32, "shard_size_mb": 0.012, "progress": False}
    meta0 = prepare_dataset(dm, tmp_path / "w0", num_workers=0, **kw)
    meta2 = prepare_dataset(dm, tmp_path / "w2", num_workers=2, **kw)
    assert meta0["splits"] == meta2["splits"]
    shards = _shard_bytes(tmp_path / "w0")
    assert len(shards) >= 3 and shards == _shard_bytes(tmp_path / "w2")


def test_files_layout_keeps_the_tree(folder_root, tmp_path):
    dm = VideoFolderDataModule(root=str(folder_root))
    out = tmp_path / "files"
    meta = prepare_dataset(dm, out, format="files", short_side=32, num_workers=0, progress=False)
    train = meta["splits"]["train"]
    assert meta["layout"] == "files" and "shards" not in train
    assert train["files"] == ["train/cat/a.mp4", "train/cat/b.mp4", "train/dog/c.mp4", "train/dog/d.mp4"]
    assert [s["video_id"] for s in train["samples"]] == [0, 1, 2, 3] and train["num_bad"] == 1
    for rel in train["files"]:
        index = build_index(out / "train" / rel)
        assert min(index.width, index.height) == 32 and index.num_frames == 12
    assert read_meta(out)["splits"]["test"]["files"] == ["test/cat/t0.mp4", "test/dog/t1.mp4"]


def test_rerun_skips_finished_shards_and_redoes_missing_ones(folder_root, tmp_path):
    dm = VideoFolderDataModule(root=str(folder_root))
    kw = {"short_side": 32, "shard_size_mb": 0.012, "num_workers": 0, "progress": False}
    out = tmp_path / "out"
    prepare_dataset(dm, out, **kw)
    reference = _shard_bytes(out)
    first = out / "train" / "shard-000000.tar"
    stamp = first.stat().st_mtime_ns
    (out / "train" / "shard-000001.tar").unlink()
    # safe_io's temporary of a write killed part way (atomic_writer names them `.<name>.<random>.tmp`)
    (out / "train" / ".shard-000002.tar.k3j9x0a1.tmp").write_bytes(b"half a shard from a killed run")
    (out / "meta.json").unlink()

    meta = prepare_dataset(dm, out, **kw)
    assert first.stat().st_mtime_ns == stamp  # finished: not rewritten
    assert _shard_bytes(out) == reference
    assert not list(out.rglob("*.tmp"))
    assert meta["splits"]["train"]["num_bad"] == 1  # bad entries of skipped shards are still listed

    with pytest.raises(PrepareError, match=r"short_side: .* prepared with short_side=32"):
        prepare_dataset(dm, out, **{**kw, "short_side": 64})
    with pytest.raises(PrepareError, match=r"shard_size_mb"):
        prepare_dataset(dm, out, **{**kw, "shard_size_mb": 1.0})
    with pytest.raises(PrepareError, match=r"format"):
        prepare_dataset(dm, out, **{**kw, "format": "files"})


_CHILD = """
import sys
from datamodules import VideoFolderDataModule, prepare_dataset
dm = VideoFolderDataModule(root=sys.argv[1])
prepare_dataset(dm, sys.argv[2], short_side=64, shard_size_mb=0.001, num_workers=0, progress=False)
"""


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_bytes(tmp_path):
    root = tmp_path / "src"
    for k in range(6):
        _clip(root / "train" / "c" / f"v{k}.mp4", k, frames=40, size=(128, 96))
    dm = VideoFolderDataModule(root=str(root))
    reference = tmp_path / "reference"
    prepare_dataset(dm, reference, short_side=64, shard_size_mb=0.001, num_workers=0, progress=False)
    expected = _shard_bytes(reference)
    assert len(expected) == 6  # one shard per video

    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = subprocess.Popen([sys.executable, "-c", _CHILD, str(root), str(out)], env=env, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "train" / "shard-000000.tar").exists():
            assert child.poll() is None and time.monotonic() < deadline, "the child ended before its first shard"
            time.sleep(0.01)
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    left = _shard_bytes(out)
    assert 1 <= len(left) < 6 and not (out / "meta.json").exists()
    for name, data in left.items():  # a final name never holds a partial shard
        assert data == expected[name]

    meta = prepare_dataset(dm, out, short_side=64, shard_size_mb=0.001, num_workers=0, progress=False)
    assert _shard_bytes(out) == expected
    assert meta["splits"] == read_meta(reference)["splits"]


def test_a_split_of_bad_videos_is_an_error(tmp_path):
    root = tmp_path / "src"
    _clip(root / "train" / "c" / "ok.mp4", 0)
    (root / "test" / "c").mkdir(parents=True)
    (root / "test" / "c" / "empty.mp4").write_bytes(b"")
    (root / "test" / "c" / "junk.mp4").write_bytes(b"junk" * 100)
    dm = VideoFolderDataModule(root=str(root))
    with pytest.raises(PrepareError, match=r"split 'test': all 2 videos are bad \(.*empty.mp4: zero-byte file"):
        prepare_dataset(dm, tmp_path / "out", short_side=32, num_workers=0, progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()
    meta = prepare_dataset(dm, tmp_path / "out", short_side=32, num_workers=0, progress=False, splits=["train"])
    assert list(meta["splits"]) == ["train"] and meta["splits"]["train"]["num_samples"] == 1


def test_bad_arguments_are_named(folder_root, tmp_path):
    dm = VideoFolderDataModule(root=str(folder_root))
    cases = [
        ({"format": "zip"}, r"format: expected one of \('shards', 'files'\), got 'zip'"),
        ({"short_side": -2}, r"short_side: expected 0 .* got -2"),
        ({"short_side": 33}, r"short_side: expected 0 .* even .* got 33"),
        ({"shard_size_mb": 0}, r"shard_size_mb: expected a number > 0, got 0"),
        ({"splits": ["valid"]}, r"splits: expected names from"),
        ({"num_workers": -1}, r"num_workers: expected None or an integer >= 0"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            prepare_dataset(dm, tmp_path / "out", progress=False, **kwargs)
    assert not (tmp_path / "out").exists()
    listing = tmp_path / "train.txt"
    listing.write_text(f"{folder_root / 'train' / 'cat' / 'a.mp4'} 0\n", encoding="utf-8")
    train_only = VideoListDataModule(root=str(tmp_path), train_list=str(listing))
    with pytest.raises(ValueError, match=r"splits: VideoListDataModule has no 'test' split \(it has: train\)"):
        prepare_dataset(train_only, tmp_path / "out", splits=["train", "test"], progress=False)
    a_file = tmp_path / "file.tar"
    a_file.write_bytes(b"")
    with pytest.raises(ValueError, match=r"output: expected a folder .* existing file"):
        prepare_dataset(dm, a_file, progress=False)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(PrepareError, match=r"output: .* non-empty folder that vmm prepare did not write"):
        prepare_dataset(dm, foreign, progress=False)
    with pytest.raises(TypeError, match=r"dm: expected a datamodules.VideoDataModule"):
        prepare_dataset("videos/", tmp_path / "out")


def test_read_meta_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_meta(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({"format": "vmm-shards", "format_version": 9}), encoding="utf-8")
    with pytest.raises(PrepareError, match=r"meta.json: format_version: expected 1, got 9"):
        read_meta(tmp_path)
    good = {
        "format": "vmm-shards",
        "format_version": 1,
        "layout": "shards",
        "classes": ["a"],
        "settings": {"short_side": 32, "codec": "h264", "gop": 16, "crf": 23, "shard_size_mb": 8},
        "splits": {
            "train": {
                "num_samples": 2,
                "num_bad": 0,
                "bad": [],
                "shards": [{"name": "shard-000000.tar", "first_key": 0, "num_samples": 2}],
            }
        },
    }
    assert check_meta(good, "meta.json") is good
    bad_shard = json.loads(json.dumps(good))
    bad_shard["splits"]["train"]["shards"][0]["first_key"] = "0"
    with pytest.raises(PrepareError, match=r"meta.json: splits.train.shards\[0\]: expected a name and non-negative"):
        check_meta(bad_shard, "meta.json")
    miscounted = json.loads(json.dumps(good))
    miscounted["splits"]["train"]["num_samples"] = 3
    with pytest.raises(PrepareError, match=r"splits.train: shards hold 2 samples, not 3"):
        check_meta(miscounted, "meta.json")
    with pytest.raises(ValueError, match=r"root: x: layout: expected 'files'"):
        check_meta(good, "root: x", layout="files", error=ValueError)


def test_shards_read_back_by_the_sharded_datamodule(folder_root, tmp_path):
    source = VideoFolderDataModule(root=str(folder_root))
    out = tmp_path / "shards"
    prepare_dataset(source, out, short_side=32, shard_size_mb=0.012, num_workers=0, progress=False)
    dm = ShardedVideoDataModule(
        root=str(out),
        batch_size=4,
        num_workers=0,
        num_frames=4,
        crop_size=32,
        eval_short_side=32,
        test_clips=1,
        test_crops=1,
    )
    assert dm.class_names == source.class_names
    dm.setup("test")
    batches = list(dm.test_dataloader())
    labels = [label for b in batches for label in b["label"].tolist()]
    assert labels == [r.label for r in source.records("test")]
    assert all(b["video"].shape[1:] == (3, 4, 32, 32) for b in batches)


def test_untrimmed_kinetics_videos_keep_only_their_window(tmp_path):
    root = tmp_path / "k"
    _clip(root / "videos" / "yt1.mp4", 3, frames=30, fps=10)  # 3 s, untrimmed
    (root / "annotations").mkdir()
    csv = "label,youtube_id,time_start,time_end,split\nwave,yt1,0.5,1.5,train\n"
    (root / "annotations" / "train.csv").write_text(csv, encoding="utf-8")
    dm = KineticsDataModule(root=str(root), video_dir=str(root / "videos"), test_csv="train.csv")
    meta = prepare_dataset(dm, tmp_path / "cut", short_side=32, num_workers=0, progress=False, splits=["train"])
    members = _samples(tmp_path / "cut", "train")[0]
    info = json.loads(members["json"])
    assert info["num_frames"] == 10 and info["duration"] == pytest.approx(1.0) and "start" not in info
    index = build_index(_decoded_file(members["mp4"], tmp_path, "cut.mp4"))
    np.testing.assert_allclose(index.times(range(index.num_frames)), np.arange(10) / 10, atol=1e-3)
    assert meta["classes"] == ["wave"]

    prepare_dataset(dm, tmp_path / "raw", short_side=0, num_workers=0, progress=False, splits=["train"])
    members = _samples(tmp_path / "raw", "train")[0]
    info = json.loads(members["json"])
    assert members["mp4"] == (root / "videos" / "yt1.mp4").read_bytes()  # the whole file, and its window:
    assert (info["start"], info["end"], info["num_frames"]) == (0.5, 1.5, 10)

    meta = prepare_dataset(dm, tmp_path / "files", format="files", short_side=32, num_workers=0, progress=False)
    assert meta["splits"]["train"]["files"] == ["yt1_0.5-1.5.mp4"]
    assert build_index(tmp_path / "files" / "train" / "yt1_0.5-1.5.mp4").num_frames == 10
