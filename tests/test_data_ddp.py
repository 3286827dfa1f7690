"""Real DDP (2 CPU processes, gloo): training shards and an un-padded test split."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.ddp import run_datamodule_ddp

from datamodules.encode import write_video


@pytest.mark.slow
def test_ddp_shards_training_and_counts_each_test_video_once(tmp_path):
    rng = np.random.default_rng(0)
    lines = []
    for i in range(8):
        base = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
        write_video(tmp_path / f"v{i}.mp4", np.stack([np.roll(base, k, axis=0) for k in range(8)]), fps=8)
        lines.append(f"v{i}.mp4 {i % 2}")
    (tmp_path / "bad.mp4").write_bytes(b"")
    lines.append("bad.mp4 0")  # 9 videos: an odd count, which the stock sampler would pad
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    seen = run_datamodule_ddp(
        tmp_path,
        "VideoListDataModule",
        dict(
            train_list="list.txt",
            test_list="list.txt",
            batch_size=2,
            num_frames=4,
            frame_interval=1,
            train_short_side=(32, 32),
            eval_short_side=32,
            crop_size=24,
            test_clips=1,
            test_crops=3,
            test_batch_size=1,
            num_workers=1,
            pin_memory=False,
        ),
    )
    # Training: each rank its own shard (DistributedSampler), together covering the good videos.
    train = [set(s["train"]) for s in seen]
    assert len(seen[0]["train"]) + len(seen[1]["train"]) == 10  # 9 padded to 10 by the training sampler
    assert train[0] | train[1] <= set(range(8))
    # Test: no padding, every good video on exactly one rank, all three views of it.
    test = seen[0]["test"] + seen[1]["test"]
    assert sorted(test) == sorted(list(range(8)) * 3)
    assert not set(seen[0]["test"]) & set(seen[1]["test"])
    assert seen[0]["test_bad"] + seen[1]["test_bad"] == [8]
