"""ShardedVideoDataModule: shards of real and generated clips packed by `prepare_dataset`, read from
a folder, over a real HTTP server and through a pipe: command, against the file datamodules; epoch
shares, resume, bad members, cut shards, DDP, SIGTERM, the CLI. The share and bad-data tests use the
test writer (helpers.shards): exactly 3 samples per shard, and corrupt members on demand."""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REPO_ROOT, SHARED_VIDEOS
from helpers.cli import TINY_SIFA, run_vmm, tiny_config, write_config
from helpers.ddp import run_datamodule_ddp
from helpers.frames import write_jpeg_folder, write_webm
from helpers.shards import cut_shard, read_batches, serve_directory, write_shard_set

from datamodules import (
    RawFrameListDataModule,
    ShardedVideoDataModule,
    TooMuchBadData,
    VideoClipDataset,
    VideoListDataModule,
    VideoRecord,
)
from datamodules.check import check_datamodule, clean_list_files
from datamodules.encode import write_video
from datamodules.prepare import prepare_dataset
from datamodules.sharded import ShardFormatError, ShardLoader, ShardStream

SETTINGS = dict(
    batch_size=2,
    num_frames=4,
    frame_interval=1,
    train_short_side=(32, 32),
    eval_short_side=32,
    crop_size=24,
    test_clips=2,
    test_crops=3,
    test_batch_size=2,
    num_workers=0,
    pin_memory=False,
)


def _generated(folder: Path, count: int, seed: int = 0) -> list[tuple[str, int]]:
    """`count` tiny H.264 clips (8 frames, 40x32, a rolling random texture), labels alternating."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        base = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
        path = folder / f"v{i:02d}.mp4"
        write_video(path, np.stack([np.roll(base, k, axis=0) for k in range(8)]), fps=8)
        out.append((str(path), i % 2))
    return out


def _write_list(path: Path, entries) -> str:
    path.write_text("".join(f"{p} {label}\n" for p, label in entries), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """10 generated clips packed 3 per shard (4 shards) as train, val and test by the test writer."""
    root = tmp_path_factory.mktemp("tiny")
    entries = _generated(root / "videos", 10)
    write_shard_set(root / "shards", {"train": entries, "val": entries, "test": entries}, ["0", "1"])
    return {
        "root": root,
        "entries": entries,
        "shards": root / "shards",
        "list": _write_list(root / "list.txt", entries),
    }


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """The real clips (mp4 / avi), a VP9 WebM and generated clips, packed unchanged (`short_side=0`)
    by `prepare_dataset` as the test split, a few per shard."""
    if not SHARED_VIDEOS.is_dir():
        pytest.skip(f"shared test videos not found at {SHARED_VIDEOS}")
    root = tmp_path_factory.mktemp("real")
    clips = sorted(SHARED_VIDEOS.glob("*.avi")) + sorted(SHARED_VIDEOS.glob("*.mp4"))
    entries = [(str(p), k % 2) for k, p in enumerate(clips)]
    rng = np.random.default_rng(1)
    webm = write_webm(root / "clip.webm", [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(10)])
    entries += [(str(webm), 0)] + _generated(root / "videos", 3, seed=2)
    list_file = _write_list(root / "list.txt", entries)
    source = VideoListDataModule(root=str(root), test_list=list_file, class_names=["0", "1"], **SETTINGS)
    meta = prepare_dataset(source, root / "shards", short_side=0, shard_size_mb=1.0, num_workers=0, progress=False)
    assert len(meta["splits"]["test"]["shards"]) > 1
    return {"root": root, "entries": entries, "shards": root / "shards", "list": list_file}


@pytest.fixture(scope="module")
def tiny_prepared(tiny, tmp_path_factory):
    """`tiny`'s clips packed by `prepare_dataset` (original bytes) as train, val and test."""
    out = tmp_path_factory.mktemp("tiny_prepared") / "shards"
    lists = {f"{split}_list": tiny["list"] for split in ("train", "val", "test")}
    source = VideoListDataModule(root=str(tiny["root"]), class_names=["0", "1"], **lists, **SETTINGS)
    prepare_dataset(source, out, short_side=0, shard_size_mb=0.002, num_workers=0, progress=False)
    return out


def _batches(loader) -> list[dict]:
    return list(loader)


def _assert_same_batches(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys() == {"video", "label", "video_id", "view", "bad_video_ids"}
        for key in x:
            assert torch.equal(x[key], y[key]), key


def _file_dm(root: Path, list_file: str, **kw) -> VideoListDataModule:
    return VideoListDataModule(root=str(root), train_list=list_file, test_list=list_file, **{**SETTINGS, **kw})


def _shard_dm(root, **kw) -> ShardedVideoDataModule:
    return ShardedVideoDataModule(root=str(root), **{**SETTINGS, **kw})


# -- evaluation equals the files ------------------------------------------------------------------------


def test_test_batches_from_shards_equal_those_from_the_files_local_and_http(real):
    files = _file_dm(real["root"], real["list"])
    files.setup("test")
    expected = _batches(files.test_dataloader())
    local = _shard_dm(real["shards"])
    local.setup("test")
    _assert_same_batches(expected, _batches(local.test_dataloader()))
    assert [r.path for r in local.records("test")] == [p for p, _ in real["entries"]]
    with serve_directory(real["shards"]) as url:
        remote = _shard_dm(url)
        remote.setup("test")
        assert remote.class_names == ["0", "1"]
        _assert_same_batches(expected, _batches(remote.test_dataloader()))


def test_a_pipe_root_reads_through_its_command(tiny, tiny_prepared):
    files = _file_dm(tiny["root"], tiny["list"])
    files.setup("test")
    piped = _shard_dm(f"pipe:cat {tiny_prepared}/{{}}")
    piped.setup("test")
    _assert_same_batches(_batches(files.test_dataloader()), _batches(piped.test_dataloader()))


def test_frame_folder_samples_decode_like_the_folder(tmp_path):
    rng = np.random.default_rng(3)
    frames = [rng.integers(0, 256, (30, 44, 3), dtype=np.uint8) for _ in range(9)]
    folder = write_jpeg_folder(tmp_path / "frames" / "clip", frames)
    (tmp_path / "frames.txt").write_text("clip 9 1\n", encoding="utf-8")
    source = RawFrameListDataModule(
        root=str(tmp_path / "frames"), test_list=str(tmp_path / "frames.txt"), class_names=["0", "1"], **SETTINGS
    )
    prepare_dataset(source, tmp_path / "shards", short_side=0, num_workers=0, progress=False)
    dm = _shard_dm(tmp_path / "shards")
    dm.setup("test")
    (batch,) = _batches(dm.test_dataloader())
    expected = dm.predict_dataset([str(folder)])[0]  # the frame-folder reader, same test views
    assert torch.equal(batch["video"], expected["video"])
    assert batch["label"].tolist() == [1] * 6 and batch["video_id"].tolist() == [0] * 6


def test_a_time_window_in_the_json_cuts_the_packed_video(shared_videos, tmp_path):
    clip = str(shared_videos / "kinetics_arm_wrestling.mp4")  # 10 s at 28 fps
    write_shard_set(tmp_path, {"test": [(clip, 1, 2.0, 5.0), (clip, 0, 9.99, 20.0)]}, ["0", "1"])
    dm = _shard_dm(tmp_path, test_batch_size=1)
    dm.setup("test")
    windowed, empty = _batches(dm.test_dataloader())
    reference = VideoClipDataset(
        [VideoRecord(clip, 1, 2.0, 5.0)], mode="test", clip=dm.clip, transform=dm.test_transform, test_clips=2
    )[0]
    assert torch.equal(windowed["video"], reference["video"])
    assert empty["bad_video_ids"].tolist() == [1] and empty["video"].shape[0] == 0


def test_meta_json_is_checked(tmp_path):
    with pytest.raises(ShardFormatError, match="meta.json not found"):
        _ = _shard_dm(tmp_path).class_names
    (tmp_path / "meta.json").write_text(json.dumps({"format": "other"}), encoding="utf-8")
    with pytest.raises(ShardFormatError, match="format: expected .vmm-shards. \\(the output of vmm prepare\\)"):
        _ = _shard_dm(tmp_path).class_names
    with pytest.raises(ValueError, match="shuffle_buffer"):
        _shard_dm(tmp_path, shuffle_buffer=0)
    with pytest.raises(ValueError, match=r"pipe: root must contain \{\}"):
        _ = _shard_dm("pipe:cat /nowhere").class_names


# -- training order and shares ----------------------------------------------------------------------------


def _stream(dm: ShardedVideoDataModule, world: int, rank: int, **kw) -> ShardStream:
    return ShardStream(
        dm.root,
        "train",
        dm.meta["splits"]["train"],
        mode="train",
        clip=dm.clip,
        transform=dm.train_transform,
        batch_size=dm.batch_size,
        world=world,
        rank=rank,
        **kw,
    )


def _epoch_ids(stream: ShardStream, epoch: int, workers: int = 0) -> list[list[int]]:
    loader = ShardLoader(stream, num_workers=workers)
    loader.set_epoch(epoch)
    return [b["video_id"].tolist() for b in loader]


def test_ranks_get_disjoint_equal_shares_that_change_each_epoch(tiny):
    dm = _shard_dm(tiny["shards"])
    for world in (1, 2, 3):
        shares = [sum(_epoch_ids(_stream(dm, world, r), 0), []) for r in range(world)]
        assert all(len(s) == 10 // world for s in shares)
        flat = sum(shares, [])
        assert len(set(flat)) == len(flat)  # disjoint, no repeats
    one = sum(_epoch_ids(_stream(dm, 1, 0), 0), [])
    assert sorted(one) == list(range(10))
    assert sum(_epoch_ids(_stream(dm, 1, 0), 0), []) == one  # reproducible
    assert sum(_epoch_ids(_stream(dm, 1, 0), 1), []) != one  # another order next epoch
    # With 3 ranks one sample is left out per epoch, a different one across epochs.
    left_out = {
        e: set(range(10)) - set(sum((sum(_epoch_ids(_stream(dm, 3, r), e), []) for r in range(3)), []))
        for e in range(4)
    }
    assert all(len(v) == 1 for v in left_out.values()) and len(set().union(*left_out.values())) > 1


def test_dataloader_workers_split_the_share_exactly(tiny):
    dm = _shard_dm(tiny["shards"], batch_size=3)
    stream = _stream(dm, 1, 0)
    loader = ShardLoader(stream, num_workers=2)
    batches = _epoch_ids(stream, 0, workers=2)
    assert len(batches) == len(loader) == 4  # ceil(10 / 3), the count Lightning is told
    assert sorted(sum(batches, [])) == list(range(10))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_epoch_continues_without_repeats_or_skips(tiny, workers):
    dm = _shard_dm(tiny["shards"], shuffle_buffer=4)
    full = _epoch_ids(_stream(dm, 1, 0), 2, workers)
    loader = ShardLoader(_stream(dm, 1, 0), num_workers=workers)
    loader.set_epoch(2)
    it = iter(loader)
    before = [next(it)["video_id"].tolist() for _ in range(2)]
    state = loader.state_dict()
    assert state["epoch"] == 2 and state["batches"] == 2
    del it
    resumed = ShardLoader(_stream(dm, 1, 0), num_workers=workers)
    resumed.load_state_dict(state)
    resumed.set_epoch(2)
    after = [b["video_id"].tolist() for b in resumed]
    assert len(before) + len(after) == len(full) == 5
    assert sorted(sum(before + after, [])) == sorted(sum(full, [])) == list(range(10))
    # Saved at the epoch's end: a resume starts the next epoch afresh.
    finished = ShardLoader(_stream(dm, 1, 0), num_workers=workers)
    finished.load_state_dict(resumed.state_dict())
    assert [b["video_id"].tolist() for b in finished] == _epoch_ids(_stream(dm, 1, 0), 3, workers)
    # A state saved with other settings is refused with a warning: the epoch starts over.
    other = ShardLoader(_stream(dm, 1, 0, seed=1), num_workers=workers)
    with pytest.warns(UserWarning, match="seed 0 -> 1"):
        other.load_state_dict(state)


# -- bad data ---------------------------------------------------------------------------------------------


def test_corrupt_member_is_a_bad_video_and_the_epoch_goes_on(tiny, tmp_path, caplog):
    entries = tiny["entries"]
    write_shard_set(
        tmp_path,
        {"train": entries, "test": entries},
        ["0", "1"],
        replace_data={("train", 4): b"\x00not a video" * 50, ("test", 4): b"junk" * 10},
    )
    dm = _shard_dm(tmp_path)
    dm.setup("fit")
    with caplog.at_level(logging.WARNING):
        train = _batches(dm.train_dataloader())
    assert len(train) == 5 and sum(len(b["video_id"]) for b in train) == 10  # the count stays
    assert sum((b["bad_video_ids"].tolist() for b in train), []) == [4]
    assert 4 not in sum((b["video_id"].tolist() for b in train), [])
    assert "skipping unreadable video" in caplog.text
    dm.setup("test")
    test = _batches(dm.test_dataloader())
    assert sorted(set(sum((b["video_id"].tolist() for b in test), []))) == [k for k in range(10) if k != 4]
    assert sum((b["bad_video_ids"].tolist() for b in test), []) == [4]


def test_truncated_shard_keeps_what_was_read_and_counts_the_rest(tiny, tmp_path, caplog):
    shutil.copytree(tiny["shards"], tmp_path / "shards")
    # keys 3, 4, 5: cut inside the video of key 4
    cut_shard(tmp_path / "shards" / "test" / "shard-000001.tar", "000000004.mp4")
    cut_shard(tmp_path / "shards" / "train" / "shard-000001.tar", "000000004.mp4")
    dm = _shard_dm(tmp_path / "shards")
    dm.setup("test")
    with caplog.at_level(logging.WARNING):
        test = _batches(dm.test_dataloader())
    assert "shard-000001.tar: 2 of the 3 samples wanted could not be read" in caplog.text
    assert sorted(set(sum((b["video_id"].tolist() for b in test), []))) == [0, 1, 2, 3, 6, 7, 8, 9]
    assert sum((b["bad_video_ids"].tolist() for b in test), []) == [4, 5]
    dm.setup("fit")
    train = _batches(dm.train_dataloader())
    assert len(train) == 5 and sum(len(b["video_id"]) for b in train) == 10  # padded past the share's end
    assert sorted(sum((b["bad_video_ids"].tolist() for b in train), [])) == [4, 5]


def test_unreachable_http_shard_counts_as_missing(tiny, tmp_path):
    shutil.copytree(tiny["shards"], tmp_path / "shards")
    (tmp_path / "shards" / "test" / "shard-000002.tar").unlink()  # keys 6, 7, 8: HTTP 404
    with serve_directory(tmp_path / "shards") as url:
        dm = _shard_dm(url)
        dm.setup("test")
        test = _batches(dm.test_dataloader())
    assert sum((b["bad_video_ids"].tolist() for b in test), []) == [6, 7, 8]
    assert sorted(set(sum((b["video_id"].tolist() for b in test), []))) == [0, 1, 2, 3, 4, 5, 9]


def test_a_split_of_unreadable_shards_raises_too_much_bad_data(tiny, tmp_path):
    shutil.copytree(tiny["shards"], tmp_path / "shards")
    for shard in (tmp_path / "shards" / "train").glob("*.tar"):
        shard.write_bytes(b"")
    dm = _shard_dm(tmp_path / "shards")
    dm.setup("fit")
    with pytest.raises(TooMuchBadData):
        _batches(dm.train_dataloader())


def test_check_data_decodes_every_packed_sample_and_counts_the_bad_ones_per_split(tiny, tmp_path):
    entries = tiny["entries"]
    rng = np.random.default_rng(5)
    folder = write_jpeg_folder(
        tmp_path / "frames", [rng.integers(0, 256, (30, 44, 3), dtype=np.uint8) for _ in range(5)]
    )
    write_shard_set(
        tmp_path / "shards",
        {"train": entries, "test": [*entries, (str(folder), 1)]},
        ["0", "1"],
        replace_data={("train", 4): b"\x00not a video" * 50},
    )
    cut_shard(tmp_path / "shards" / "test" / "shard-000002.tar", "000000007.mp4")  # keys 6, 7, 8: 7 and 8 lost
    dm = _shard_dm(tmp_path / "shards")
    out = io.StringIO()
    report = check_datamodule(dm, splits=["train", "val", "test"], num_workers=0, out=out)
    train, val, test = (report.splits[s] for s in ("train", "val", "test"))
    assert (train.videos, train.readable) == (10, 9) and train.frames == [8] * 9
    assert [(where, reason.startswith("cannot open container")) for where, reason in train.unreadable] == [
        (f"train key 4 ({entries[4][0]})", True)
    ]
    assert (test.videos, test.readable) == (11, 9) and sorted(test.frames) == [5] + [8] * 8  # the frame sample: 5
    assert [where for where, _ in test.unreadable] == ["test key 7", "test key 8"]
    assert all("not read from" in reason for _, reason in test.unreadable)
    assert val == dataclasses.replace(test, split="val")  # val falls back to test: its shards are read once
    assert report.decoded == 21 and not report.ok
    assert "unreadable videos (3)" in out.getvalue()
    with pytest.raises(ValueError, match="write_clean_list: a shard set has no annotation lists"):
        clean_list_files(dm, ["train"], tmp_path / "clean.txt")


# -- DDP, SIGTERM and the CLI -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_ranks_get_equal_disjoint_training_shares_and_test_every_video_once(tiny, tmp_path):
    shutil.copytree(tiny["shards"], tmp_path, dirs_exist_ok=True)
    seen = run_datamodule_ddp(tmp_path, "ShardedVideoDataModule", {**SETTINGS, "test_crops": 1, "num_workers": 1})
    train = [s["train"] for s in seen]
    assert len(train[0]) == len(train[1]) == 5
    assert not set(train[0]) & set(train[1]) and sorted(train[0] + train[1]) == list(range(10))
    test = seen[0]["test"] + seen[1]["test"]
    assert sorted(test) == sorted(list(range(10)) * 2)  # every video once, both views
    assert not set(seen[0]["test"]) & set(seen[1]["test"])


def _data_config(kind: str, root, list_file: str | None = None, **kw) -> dict:
    settings = {**SETTINGS, "test_crops": 1, **kw}
    if kind == "files":
        return {
            "class_path": "datamodules.VideoListDataModule",
            "init_args": {"root": str(root), "train_list": list_file, "test_list": list_file, **settings},
        }
    return {"class_path": "datamodules.ShardedVideoDataModule", "init_args": {"root": str(root), **settings}}


def _vmm_env_config(tmp_path: Path, data: dict, out: Path, **trainer) -> Path:
    cfg = tiny_config(tmp_path, out, net=TINY_SIFA, **trainer)
    cfg["data"] = data
    return write_config(tmp_path / f"{out.name}.yaml", cfg)


def _results(out: Path) -> dict:
    (path,) = out.rglob("test_results.json")
    return json.loads(path.read_text(encoding="utf-8"))


def _scores(out: Path) -> dict:
    (path,) = out.rglob("scores_test.json")
    return json.loads(path.read_text(encoding="utf-8"))


@pytest.mark.slow
def test_vmm_fit_and_test_from_shards_local_and_http_match_the_files(tiny, tiny_prepared, tmp_path, monkeypatch):
    """`vmm fit` from a folder of shards and over HTTP trains the same weights (same order, same
    clips); `vmm test` of that checkpoint from files, from the folder and over HTTP gives the same
    results and per-video scores."""
    monkeypatch.setenv("PYTHONPATH", f"{REPO_ROOT}:{REPO_ROOT / 'tests'}")
    results = {}
    with serve_directory(tiny_prepared) as url:
        roots = {"local": tiny_prepared, "http": url}
        ckpts = {}
        for name, root in roots.items():
            out = tmp_path / f"fit_{name}"
            cfg = _vmm_env_config(tmp_path, _data_config("shards", root), out, max_epochs=1)
            run_vmm(["fit", "--config", str(cfg)], cwd=tmp_path)
            (ckpts[name],) = out.rglob("last.ckpt")
        weights = {k: torch.load(c, map_location="cpu", weights_only=False)["state_dict"] for k, c in ckpts.items()}
        assert weights["local"].keys() == weights["http"].keys()
        assert all(torch.equal(weights["local"][k], weights["http"][k]) for k in weights["local"])
        for name, data in {
            "files": _data_config("files", tiny["root"], tiny["list"]),
            "local": _data_config("shards", tiny_prepared),
            "http": _data_config("shards", url),
        }.items():
            cfg = _vmm_env_config(tmp_path, data, tmp_path / name)
            run_vmm(["test", "--config", str(cfg), "--ckpt_path", str(ckpts["http"])], cwd=tmp_path)
            results[name] = (_results(tmp_path / name), _scores(tmp_path / name))
    assert results["files"][0]["num_videos"] == 10
    assert results["local"] == results["files"] == results["http"]


@pytest.mark.slow
def test_sigterm_then_resume_continues_the_epoch_without_repeats_or_skips(tiny, tmp_path, monkeypatch):
    """A real SIGTERM in `vmm fit` mid-epoch 1 (interrupted.ckpt), then `--ckpt_path` resumes: the
    batches of epoch 1 before and after are those of an uninterrupted run, as a set, none twice."""
    monkeypatch.setenv("PYTHONPATH", f"{REPO_ROOT}:{REPO_ROOT / 'tests'}")
    data = _data_config("shards", tiny["shards"], num_workers=2, shuffle_buffer=4)

    def config(name: str, callbacks: list) -> Path:
        cfg = tiny_config(tmp_path, tmp_path / name, net=TINY_SIFA, max_epochs=2)
        cfg["data"] = data
        record = {
            "class_path": "helpers.shards.RecordTrainBatches",
            "init_args": {"path": str(tmp_path / f"{name}.jsonl")},
        }
        cfg["trainer"]["callbacks"] += [record, *callbacks]
        return write_config(tmp_path / f"{name}.yaml", cfg)

    run_vmm(["fit", "--config", str(config("whole", []))], cwd=tmp_path)
    stop = {"class_path": "helpers.shards.SigtermAtStep", "init_args": {"step": 7}}  # epoch 1, batch 2 of 5
    with pytest.raises(AssertionError, match="exited with 143"):
        run_vmm(["fit", "--config", str(config("cut", [stop]))], cwd=tmp_path)
    (ckpt,) = (tmp_path / "cut").rglob("interrupted.ckpt")
    run_vmm(["fit", "--config", str(config("resumed", [])), "--ckpt_path", str(ckpt)], cwd=tmp_path)
    whole = [b for b in read_batches(tmp_path / "whole.jsonl") if b["epoch"] == 1]
    cut = [b for b in read_batches(tmp_path / "cut.jsonl") if b["epoch"] == 1]
    resumed = [b for b in read_batches(tmp_path / "resumed.jsonl") if b["epoch"] == 1]
    assert len(cut) == 2 and len(resumed) == 3 and len(whole) == 5
    assert [b["batch"] for b in resumed] == [2, 3, 4]
    ids = sum((b["ids"] for b in cut + resumed), [])
    assert sorted(ids) == sorted(sum((b["ids"] for b in whole), [])) == list(range(10))
