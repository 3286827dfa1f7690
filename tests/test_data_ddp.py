"""Real DDP (2 CPU processes, gloo): training shards and an un-padded test split."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from datamodules.synthetic import write_video

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import lightning as L
    import torch
    from datamodules import VideoListDataModule

    root, out = sys.argv[1], sys.argv[2]

    class Recorder(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 2)
            self.seen = {"train": [], "test": [], "test_views": [], "test_bad": []}

        def training_step(self, batch, _):
            self.seen["train"] += batch["video_id"].tolist()
            x = batch["video"].float().mean(dim=(2, 3, 4)) / 255
            return torch.nn.functional.cross_entropy(self.fc(x), batch["label"])

        def test_step(self, batch, _):
            self.seen["test"] += batch["video_id"].tolist()
            self.seen["test_views"] += batch["view"].tolist()
            self.seen["test_bad"] += batch["bad_video_ids"].tolist()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    L.seed_everything(0)
    dm = VideoListDataModule(root=root, train_list="list.txt", test_list="list.txt", batch_size=2,
                             num_frames=4, frame_interval=1, train_short_side=(32, 32), eval_short_side=32,
                             crop_size=24, test_clips=1, test_crops=3, test_batch_size=1, num_workers=1,
                             pin_memory=False)
    model = Recorder()
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    with open(f"{out}/rank{trainer.global_rank}.json", "w") as fh:
        json.dump(model.seen, fh)
    """
)


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
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    script = tmp_path / "ddp_run.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        cwd=os.getcwd(),
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    seen = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # Training: each rank its own shard (DistributedSampler), together covering the good videos.
    train = [set(s["train"]) for s in seen]
    assert len(seen[0]["train"]) + len(seen[1]["train"]) == 10  # 9 padded to 10 by the training sampler
    assert train[0] | train[1] <= set(range(8))
    # Test: no padding, every good video on exactly one rank, all three views of it.
    test = seen[0]["test"] + seen[1]["test"]
    assert sorted(test) == sorted(list(range(8)) * 3)
    assert not set(seen[0]["test"]) & set(seen[1]["test"])
    assert seen[0]["test_bad"] + seen[1]["test_bad"] == [8]
