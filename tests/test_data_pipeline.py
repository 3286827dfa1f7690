"""Datasets and loaders end to end on small real files: batches, bad data, multi-view test, a Trainer."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from datamodules import (
    TooMuchBadData,
    UnpaddedDistributedSampler,
    VideoFilesDataset,
    VideoListDataModule,
    collate_clips,
)
from datamodules.encode import write_video

H, W, FRAMES = 32, 48, 24
SMALL = dict(  # clip/transform settings sized for these tiny files
    num_frames=4,
    frame_interval=2,
    train_short_side=(32, 40),
    eval_short_side=32,
    crop_size=24,
    test_clips=2,
    test_crops=3,
    num_workers=0,
    pin_memory=False,
)


@pytest.fixture(scope="module")
def video_root(tmp_path_factory) -> Path:
    """6 good videos (2 classes), and a zero-byte, a garbage, a truncated and a missing one."""
    root = tmp_path_factory.mktemp("videos")
    rng = np.random.default_rng(0)
    lines = []
    for i in range(6):
        base = rng.integers(0, 256, (H, W, 3), dtype=np.uint8)
        frames = np.stack([np.roll(base, k, axis=1) for k in range(FRAMES)])
        write_video(root / f"good{i}.mp4", frames, fps=12)
        lines.append(f"good{i}.mp4 {i % 2}")
    (root / "zero.mp4").write_bytes(b"")
    (root / "garbage.avi").write_bytes(rng.integers(0, 256, 3000, dtype=np.uint8).tobytes())
    data = (root / "good0.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    lines += ["zero.mp4 0", "garbage.avi 1", "truncated.mp4 0", "missing.mp4 1"]
    (root / "all.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (root / "good.txt").write_text("\n".join(lines[:6]) + "\n", encoding="utf-8")
    (root / "mostly_bad.txt").write_text("\n".join(lines[:1] + lines[6:] * 3) + "\n", encoding="utf-8")
    return root


BAD_IDS = {6, 7, 8, 9}


def test_train_epoch_replaces_bad_videos_and_reports_them(video_root, caplog):
    dm = VideoListDataModule(root=str(video_root), train_list="all.txt", test_list="all.txt", batch_size=4, **SMALL)
    dm.setup("fit")
    assert dm.num_classes == 2
    seen_bad, labels, n = [], [], 0
    with caplog.at_level(logging.WARNING, logger="datamodules"):
        for _ in range(2):  # two epochs: each bad file is logged once
            for batch in dm.train_dataloader():
                assert batch["video"].dtype == torch.uint8 and batch["video"].shape[1:] == (3, 4, 24, 24)
                assert batch["video_id"].max() < 6  # every sample comes from a good video
                assert torch.equal(batch["view"], torch.zeros_like(batch["view"]))
                n += batch["video"].shape[0]
                seen_bad += batch["bad_video_ids"].tolist()
                labels += batch["label"].tolist()
    assert n == 2 * 10  # bad items were replaced, not dropped
    assert BAD_IDS <= set(seen_bad) and set(seen_bad) <= BAD_IDS
    for name in ("zero.mp4", "garbage.avi", "truncated.mp4"):  # found when decoded: logged once
        assert sum(name in r.getMessage() for r in caplog.records) == 1, name
    # Known unusable at setup (not on disk): reported once per split listing it, never again.
    train_warnings = [r for r in caplog.records if "'train' split: 1 of 10 entries cannot be used" in r.getMessage()]
    assert len(train_warnings) == 1 and "missing.mp4 (file not found)" in train_warnings[0].getMessage()
    assert sum("missing.mp4" in r.getMessage() for r in caplog.records if r.name == "datamodules.dataset") == 0
    assert "zero-byte" in caplog.text and "file not found" in caplog.text


def test_val_and_test_drop_bad_videos_and_count_them(video_root):
    dm = VideoListDataModule(root=str(video_root), train_list="all.txt", test_list="all.txt", batch_size=4, **SMALL)
    dm.setup("validate")
    val = list(dm.val_dataloader())
    ids = torch.cat([b["video_id"] for b in val])
    assert ids.tolist() == list(range(6))  # one centre view per good video, each once
    assert set(torch.cat([b["bad_video_ids"] for b in val]).tolist()) == BAD_IDS
    dm.setup("test")
    assert dm.test_batch_size == 1  # max(1, 4 // 6 views)
    test = list(dm.test_dataloader())
    assert len(test) == 10
    views = 2 * 3
    for vid, batch in enumerate(test):
        if vid in BAD_IDS:
            assert batch["video"].shape == (0, 3, 4, 24, 24) and batch["bad_video_ids"].tolist() == [vid]
        else:
            assert batch["video"].shape == (views, 3, 4, 24, 24)
            assert batch["video_id"].tolist() == [vid] * views
            assert batch["view"].tolist() == list(range(views))  # clip_idx * test_crops + crop_idx
            assert batch["label"].tolist() == [vid % 2] * views
            # Three different crops of each clip; two different clips.
            v = batch["video"]
            assert not torch.equal(v[0], v[1]) and not torch.equal(v[0], v[3])


def test_mostly_bad_data_stops_with_a_clear_error(video_root):
    dm = VideoListDataModule(
        root=str(video_root), train_list="mostly_bad.txt", test_list="good.txt", batch_size=13, max_retries=3, **SMALL
    )
    dm.setup("fit")
    with pytest.raises(TooMuchBadData, match="could not be decoded"):
        for _ in dm.train_dataloader():
            pass


def test_predict_dataset_on_files(video_root, shared_videos):
    dm = VideoListDataModule(root=str(video_root), train_list="good.txt", batch_size=4, **SMALL)
    ds = dm.predict_dataset([str(shared_videos / "mpeg4_320x240.avi"), str(video_root / "zero.mp4")])
    assert dm.test_settings["test_clips"] == 2 and dm.test_settings["crop_size"] == 24
    batch = collate_clips([ds[0], ds[1]])
    assert batch["video"].shape == (6, 3, 4, 24, 24)
    assert batch["label"].tolist() == [-1] * 6 and batch["video_id"].tolist() == [0] * 6
    assert batch["bad_video_ids"].tolist() == [1]
    full = VideoFilesDataset([str(shared_videos / "h264_340x256.mp4")], num_frames=8, short_side=64, crop_size=None)
    item = full[0]
    assert item["video"].shape == (1, 3, 8, 64, 85)
    with pytest.raises(TypeError, match="paths"):
        VideoFilesDataset("one.mp4")


def test_collate_all_empty_and_unpadded_sampler():
    empty = {
        "video": torch.empty(0, 3, 4, 8, 8, dtype=torch.uint8),
        "label": torch.empty(0, dtype=torch.int64),
        "video_id": torch.empty(0, dtype=torch.int64),
        "view": torch.empty(0, dtype=torch.int64),
        "bad_video_ids": torch.tensor([3]),
    }
    batch = collate_clips([empty, {**empty, "bad_video_ids": torch.tensor([5])}])
    assert batch["video"].shape == (0, 3, 4, 8, 8) and batch["bad_video_ids"].tolist() == [3, 5]
    data = list(range(10))
    shards = [list(UnpaddedDistributedSampler(data, num_replicas=3, rank=r)) for r in range(3)]
    assert sorted(i for s in shards for i in s) == data  # every item exactly once, no padding
    assert [len(UnpaddedDistributedSampler(data, num_replicas=3, rank=r)) for r in range(3)] == [4, 3, 3]


class _Counter(L.LightningModule):
    """A tiny classifier that records what the loaders delivered."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.fc = torch.nn.Linear(3, num_classes)
        self.seen: dict[str, list] = {"train_bad": [], "test_ids": [], "test_bad": []}

    def _logits(self, video):
        return self.fc(video.float().mean(dim=(2, 3, 4)) / 255)

    def training_step(self, batch, _):
        self.seen["train_bad"] += batch["bad_video_ids"].tolist()
        return torch.nn.functional.cross_entropy(self._logits(batch["video"]), batch["label"])

    def test_step(self, batch, _):
        self.seen["test_ids"] += batch["video_id"].tolist()
        self.seen["test_bad"] += batch["bad_video_ids"].tolist()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_fit_and_test(video_root, tmp_path):
    dm = VideoListDataModule(root=str(video_root), train_list="all.txt", test_list="all.txt", batch_size=5, **SMALL)
    model = _Counter(dm.num_classes)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert set(model.seen["train_bad"]) == BAD_IDS
    assert sorted(set(model.seen["test_ids"])) == list(range(6))
    assert len(model.seen["test_ids"]) == 6 * 6
    assert sorted(model.seen["test_bad"]) == sorted(BAD_IDS)


def test_kinetics_untrimmed_window_is_honoured(tmp_path, shared_videos):
    """An untrimmed `{youtube_id}.mp4`: only frames inside [time_start, time_end) are sampled."""
    import av

    from datamodules import KineticsDataModule

    (tmp_path / "videos").mkdir()
    (tmp_path / "videos" / "abc.mp4").symlink_to(shared_videos / "kinetics_arm_wrestling.mp4")
    (tmp_path / "annotations").mkdir()
    (tmp_path / "annotations" / "train.csv").write_text(
        "label,youtube_id,time_start,time_end,split\narm wrestling,abc,2,4,train\n", encoding="utf-8"
    )
    dm = KineticsDataModule(
        root=str(tmp_path),
        video_dir=str(tmp_path / "videos"),
        test_csv="train.csv",
        num_frames=8,
        frame_interval=4,
        eval_short_side=256,
        crop_size=None,
        test_clips=2,
        test_crops=1,
        num_workers=0,
        pin_memory=False,
    )
    [rec] = dm.records("train")
    assert (rec.start, rec.end) == (2.0, 4.0)
    item = dm.dataset("test")[0]
    with av.open(str(shared_videos / "kinetics_arm_wrestling.mp4")) as c:
        ref = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
    # 28 fps: the window holds frames 56..111 (56 frames); clips of span 29 start at 0 and 27 in it.
    window = list(range(56, 112))
    for view, start in enumerate((0, 27)):
        idx = [window[start + 4 * k] for k in range(8)]
        got = item["video"][view].permute(1, 2, 3, 0).numpy()
        for k, i in enumerate(idx):
            np.testing.assert_array_equal(got[k], ref[i])


def test_bad_fraction_counts_distinct_videos(tmp_path, video_root):
    """More than max_bad_fraction of the distinct videos tried are bad: a clear error."""
    lines = ["good0.mp4 0", "good1.mp4 1"] + [f"{tmp_path}/gone{i}.mp4 {i % 2}" for i in range(10)]
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    dm = VideoListDataModule(
        root=str(video_root),
        train_list=str(tmp_path / "list.txt"),
        batch_size=1,
        max_retries=50,
        max_bad_fraction=0.5,
        **SMALL,
    )
    dm.setup("fit")
    with pytest.raises(TooMuchBadData, match=r"of the \d+ videos tried in this process could not be decoded"):
        for _ in dm.train_dataloader():
            pass
