"""The synthetic motion dataset: time-reversal pairs, cache layout, atomic generation, determinism."""

from __future__ import annotations

import csv
import fcntl
import json
import logging
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules import SyntheticMotionDataModule
from datamodules.encode import pick_encoder
from datamodules.safe_io import atomic_write_text
from datamodules.synthetic import (
    CacheNotWritableError,
    SyntheticSpec,
    class_names_for,
    clean_stale_temporaries,
    generate_dataset,
    render_video,
)

TINY = dict(
    num_classes=4,
    train_per_class=3,
    val_per_class=1,
    test_per_class=2,
    video_frames=10,
    frame_size=32,
    fps=5,
    speed_range=(1.0, 3.0),
    num_frames=8,
    frame_interval=1,
    train_short_side=(32, 36),
    eval_short_side=32,
    crop_size=24,
    batch_size=4,
    generate_workers=1,
    pin_memory=False,
)


def test_class_pairs_are_exact_time_reversals():
    spec = SyntheticSpec(num_classes=12, video_frames=9, frame_size=32)
    assert spec.class_names[:4] == ["translate_right", "translate_left", "translate_down", "translate_up"]
    for c in range(0, 12, 2):
        for index in (0, 5):
            a, la = render_video(spec, "train", index, label=c)
            b, lb = render_video(spec, "train", index, label=c + 1)
            assert (la, lb) == (c, c + 1)
            np.testing.assert_array_equal(a[::-1], b, err_msg=spec.class_names[c])
            assert not np.array_equal(a, b)  # there is motion to reverse
    with pytest.raises(ValueError, match="num_classes"):
        class_names_for(5)


def test_motion_size_follows_speed_range():
    slow = SyntheticSpec(num_classes=2, video_frames=6, frame_size=48, speed_range=(1.0, 1.0), max_objects=1)
    fast = SyntheticSpec(num_classes=2, video_frames=6, frame_size=48, speed_range=(4.0, 4.0), max_objects=1)
    # Mean absolute frame difference grows with speed (same appearance draws).
    diff = [
        np.abs(np.diff(render_video(s, "train", 3, label=0)[0].astype(np.int16), axis=0)).mean() for s in (slow, fast)
    ]
    assert diff[1] > 1.5 * diff[0]


def test_datamodule_generates_once_and_reads_through_kinetics(tmp_path):
    dm = SyntheticMotionDataModule(root=str(tmp_path), **TINY)
    # Available before any file exists (the CLI links num_classes into the network first).
    assert dm.class_names == ["translate_right", "translate_left", "translate_down", "translate_up"]
    assert dm.num_classes == 4 and dm.reverse_of == [1, 0, 3, 2] and dm.reverse_class(2) == 3
    dm.prepare_data()
    root = tmp_path / "synthetic_motion" / dm.spec.digest()
    assert (root / "meta.json").is_file()
    with open(root / "annotations" / "train.csv", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 12 and rows[1]["label"] == "translate_left"
    assert [p.name for p in (tmp_path / "synthetic_motion").iterdir()] == [dm.spec.digest()]  # no temp dirs
    dm.setup("fit")
    train = dm.records("train")
    assert [r.label for r in train] == [i % 4 for i in range(12)]
    assert all(f"/train/{dm.class_names[r.label]}/" in r.path for r in train)
    assert len(dm.records("val")) == 4 and len(dm.records("test")) == 8
    batch = next(iter(dm.train_dataloader()))
    assert batch["video"].shape == (4, 3, 8, 24, 24) and batch["video"].dtype == torch.uint8
    stamp = os.stat(root / "meta.json").st_mtime_ns
    again = SyntheticMotionDataModule(root=str(tmp_path), **TINY)
    again.prepare_data()
    assert os.stat(root / "meta.json").st_mtime_ns == stamp  # cached, not regenerated
    other = SyntheticMotionDataModule(root=str(tmp_path), **{**TINY, "seed": 1})
    assert other.spec.digest() != dm.spec.digest()
    with pytest.raises(ValueError, match="flip"):
        SyntheticMotionDataModule(root=str(tmp_path), flip=True)


def test_default_cache_root_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("VMM_CACHE", str(tmp_path / "cache"))
    dm = SyntheticMotionDataModule(**TINY)
    assert str(dm.root).startswith(str(tmp_path / "cache" / "synthetic_motion"))


def _generate(args):
    spec, root = args
    return str(generate_dataset(spec, root, workers=1))


def test_concurrent_generation_is_atomic(tmp_path):
    spec = SyntheticSpec(
        num_classes=2,
        train_per_class=4,
        val_per_class=1,
        test_per_class=1,
        video_frames=4,
        frame_size=16,
        encoder=pick_encoder(),
    )
    base = tmp_path / "synthetic_motion"
    base.mkdir()
    (base / f".tmp-{spec.digest()}-1-deadbeef").mkdir()  # an interrupted earlier run
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(2) as pool:
        paths = pool.map(_generate, [(spec, tmp_path), (spec, tmp_path)])
    assert paths[0] == paths[1]
    final = base / spec.digest()
    assert sorted(p.name for p in base.iterdir()) == sorted([spec.digest(), f".tmp-{spec.digest()}-1-deadbeef"])
    assert len(list(final.rglob("*.mp4"))) == 2 * 4 + 2 + 2


def test_encoder_fallback(caplog):
    assert pick_encoder() in ("libx264", "libopenh264", "h264", "mpeg4")
    with caplog.at_level(logging.WARNING):
        assert pick_encoder(preferred=("no_such_encoder",)) == "mpeg4"
    assert "no working H.264 encoder" in caplog.text


def _batches(dm, seed):
    torch.manual_seed(seed)
    return [b for b in dm.train_dataloader()]


def test_two_workers_give_identical_batches_for_the_same_seed(tmp_path):
    dm = SyntheticMotionDataModule(root=str(tmp_path), **{**TINY, "num_workers": 2})
    dm.setup("fit")
    a, b, c = _batches(dm, 0), _batches(dm, 0), _batches(dm, 1)
    assert len(a) == 3
    for x, y in zip(a, b, strict=True):
        for key in ("video", "label", "video_id", "view"):
            assert torch.equal(x[key], y[key]), key
    assert not all(torch.equal(x["video"], y["video"]) for x, y in zip(a, c, strict=True))


def test_persistent_workers_draw_new_augmentations_each_epoch(tmp_path):
    dm = SyntheticMotionDataModule(root=str(tmp_path), **{**TINY, "num_workers": 2, "persistent_workers": True})
    dm.setup("fit")
    loader = dm.train_dataloader()
    torch.manual_seed(0)
    epochs = []
    for _ in range(2):
        batches = list(loader)
        ids = torch.cat([b["video_id"] for b in batches])
        videos = torch.cat([b["video"] for b in batches])[ids.argsort()]
        epochs.append(videos)
    assert not torch.equal(epochs[0], epochs[1])


def test_default_task_keeps_the_earlier_cache_digest():
    # The task field came later; direction (the default) must not move existing caches.
    assert SyntheticSpec().digest() == "68b004c57d21"
    assert SyntheticSpec(num_classes=2, speed_range=(1.0, 2.0)).digest() == "c7c21651389f"
    assert SyntheticSpec(num_classes=2, task="coherence").digest() != SyntheticSpec(num_classes=2).digest()


def test_coherence_task_shuffles_the_same_frames():
    spec = SyntheticSpec(num_classes=2, task="coherence", video_frames=8, frame_size=32)
    assert spec.class_names == ["ordered", "shuffled"]
    for index in (0, 1, 7):
        ordered, lo = render_video(spec, "train", index, label=0)
        shuffled, ls = render_video(spec, "train", index, label=1)
        assert (lo, ls) == (0, 1)
        # The same frames (so the same unordered set: an order-blind model is at 1/2) in another order,
        # and not the time reversal (a coherent motion too).
        key = lambda frames: sorted(f.tobytes() for f in frames)  # noqa: E731
        assert key(ordered) == key(shuffled)
        assert not np.array_equal(ordered, shuffled) and not np.array_equal(ordered[::-1], shuffled)
        assert np.abs(np.diff(ordered.astype(np.int16), axis=0)).mean() > 0  # it moves
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSpec(num_classes=4, task="coherence")
    with pytest.raises(ValueError, match="video_frames"):
        SyntheticSpec(num_classes=2, task="coherence", video_frames=2)
    with pytest.raises(ValueError, match="task"):
        SyntheticSpec(num_classes=2, task="shuffle")


def test_appearance_task_changes_only_the_objects():
    spec = SyntheticSpec(num_classes=4, task="appearance", video_frames=6, frame_size=48)
    assert spec.class_names == ["ellipse_stripes", "ellipse_checker", "polygon_stripes", "polygon_checker"]
    clips = [render_video(spec, "test", 5, label=c)[0] for c in range(4)]
    for c in range(1, 4):
        changed = np.any(clips[0] != clips[c], axis=-1)  # [T,H,W]: where the objects are drawn differently
        assert changed.any() and changed.mean() < 0.5  # the background and the motion are the label-free draws
    # The same trajectory for every label: the changed region moves identically, so its first and last
    # frames differ alike.
    moved = [np.any(c[0] != c[-1], axis=-1) for c in clips]
    assert max(float(np.mean(m != moved[0])) for m in moved) < 0.1
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticSpec(num_classes=2, task="appearance")


def test_datamodule_task_option(tmp_path):
    coherence = SyntheticMotionDataModule(
        root=str(tmp_path), **{**TINY, "num_classes": 2, "task": "coherence", "video_frames": 8}
    )
    assert coherence.class_names == ["ordered", "shuffled"] and coherence.reverse_of == [0, 1]
    direction = SyntheticMotionDataModule(root=str(tmp_path), **{**TINY, "num_classes": 2, "video_frames": 8})
    assert coherence.spec.digest() != direction.spec.digest()  # its own cache directory
    coherence.setup("fit")
    batch = next(iter(coherence.train_dataloader()))
    assert batch["video"].shape == (4, 3, 8, 24, 24)
    assert sorted(r.label for r in coherence.records("train")) == [0, 0, 0, 1, 1, 1]
    appearance = SyntheticMotionDataModule(root=str(tmp_path), **{**TINY, "task": "appearance"})
    assert appearance.num_classes == 4 and appearance.reverse_of == [0, 1, 2, 3]


# ------------------------------------------------------------------ the cache: stale, incomplete, read-only


def _tiny_spec() -> SyntheticSpec:
    return SyntheticSpec(
        num_classes=2,
        train_per_class=1,
        val_per_class=1,
        test_per_class=1,
        video_frames=4,
        frame_size=16,
        encoder=pick_encoder(),
    )


def test_stale_temporaries_of_killed_runs_are_removed_live_ones_kept(tmp_path):
    spec = _tiny_spec()
    base = tmp_path / "synthetic_motion"
    base.mkdir()
    old = time.time() - 3600
    dead, live, fresh = (base / f".tmp-{spec.digest()}-{tag}" for tag in ("1-dead", "2-live", "3-fresh"))
    for d in (dead, live, fresh):
        (d / "train").mkdir(parents=True)
    for d in (dead, live):
        os.utime(d, (old, old))
    holder = os.open(live, os.O_RDONLY)  # a run that is still writing holds this lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        final = generate_dataset(spec, tmp_path)
        assert sorted(p.name for p in base.iterdir()) == sorted([spec.digest(), live.name, fresh.name])
    finally:
        os.close(holder)
    assert clean_stale_temporaries(base) == [live]  # its run ended: now it goes too
    assert (final / "meta.json").is_file()


def test_dataset_folder_without_meta_json_is_regenerated(tmp_path):
    spec = _tiny_spec()
    final = generate_dataset(spec, tmp_path)
    (final / "meta.json").unlink()  # an incomplete dataset (e.g. a partial copy)
    (final / "stray.txt").write_text("x", encoding="utf-8")
    assert generate_dataset(spec, tmp_path) == final
    assert json.loads((final / "meta.json").read_text(encoding="utf-8"))["class_names"] == spec.class_names
    assert not (final / "stray.txt").exists()
    assert [p.name for p in (tmp_path / "synthetic_motion").iterdir()] == [spec.digest()]


def _read_only_dir(tmp_path: Path) -> Path:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        (ro / "probe").mkdir()
    except PermissionError:
        return ro
    (ro / "probe").rmdir()  # root ignores permission bits: use a file system that refuses writes
    for candidate in (Path("/sys/vmm-cache"), Path("/proc/sys/vmm-cache")):
        try:
            candidate.mkdir()
        except OSError:
            return candidate
        candidate.rmdir()
    pytest.skip("no read-only directory available to this user")


def test_read_only_cache_says_which_directory_and_how_to_move_it(tmp_path):
    ro = _read_only_dir(tmp_path)
    try:
        with pytest.raises(CacheNotWritableError, match=r"cannot write the synthetic motion dataset: .*VMM_CACHE") as e:
            generate_dataset(_tiny_spec(), ro)
        assert str(ro) in str(e.value)
    finally:
        if ro.parent == tmp_path:
            ro.chmod(0o755)


def test_meta_json_and_lists_are_replaced_atomically(tmp_path):
    target = tmp_path / "meta.json"
    target.write_text('{"old": 1}', encoding="utf-8")
    with open(target, encoding="utf-8") as reader:  # a reader that opened the file before the write
        atomic_write_text(target, '{"new": 2}')
        assert reader.read() == '{"old": 1}'  # replaced by a rename, not rewritten in place
    assert target.read_text(encoding="utf-8") == '{"new": 2}'
    assert [p.name for p in tmp_path.iterdir()] == ["meta.json"]  # no temporary left behind


def test_result_notes_per_task_and_the_config_note(tmp_path):
    direction = SyntheticMotionDataModule(root=str(tmp_path), **TINY)
    assert "capped at 50% (the pair, never the member)" in direction.result_notes({})[0]
    coherence = SyntheticMotionDataModule(
        root=str(tmp_path),
        **{**TINY, "num_classes": 2, "task": "coherence", "video_frames": 8},
        result_note="this run shows X",
    )
    notes = coherence.result_notes({})
    assert "chance 50.0%" in notes[0] and "the pair" not in notes[0] and notes[-1] == "this run shows X"
    # Given results, how far top-1 stands above the ceiling, in s.d. of an accuracy at the ceiling.
    beyond = direction.result_notes({"top1": 0.664, "num_videos": 128})[1]
    assert "+3.7 s.d." in beyond and "ceiling + 3 s.d. = 63.3%" in beyond and "beyond doubt" in beyond
    near = coherence.result_notes({"top1": 0.531, "num_videos": 128})[1]
    assert "+0.7 s.d." in near and "not beyond doubt" in near
    assert (
        coherence.spec.digest()
        == SyntheticMotionDataModule(
            root=str(tmp_path), **{**TINY, "num_classes": 2, "task": "coherence", "video_frames": 8}
        ).spec.digest()
    )
