"""A tiny Conv3d classifier and in-memory moving-square clips, for real Trainer runs of VideoClassifier.

The data are small uint8 clips of a bright square moving right (label 0) or left (label 1), so a
working training loop must learn them; `collate` drops the items that stand for decode failures and
reports their video ids, as the real datamodules' collate does.
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


class TinyNet(nn.Module):
    """Conv3d(3→8, 3×3×3) → BN → ReLU → global mean → one linear layer per head."""

    def __init__(self, num_classes: int, heads: int = 2) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.body = nn.Sequential(nn.Conv3d(3, 8, 3, padding=1), nn.BatchNorm3d(8), nn.ReLU())
        self.fcs = nn.ModuleList(nn.Linear(8, num_classes) for _ in range(heads))

    def forward_heads(self, x: torch.Tensor) -> list[torch.Tensor]:
        f = self.body(x)
        # Keep the direction of motion: correlate features with a time ramp before pooling.
        ramp = torch.linspace(-1, 1, x.shape[2], device=x.device, dtype=f.dtype).view(1, 1, -1, 1, 1)
        xs = torch.linspace(-1, 1, x.shape[4], device=x.device, dtype=f.dtype).view(1, 1, 1, 1, -1)
        g = (f * ramp * xs).mean((2, 3, 4))
        return [fc(g) for fc in self.fcs]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([h.softmax(-1) for h in self.forward_heads(x)]).mean(0).log()


class MovingSquare(Dataset):
    """uint8 clips [3,T,S,S] of a bright square moving right (label 0) or left (label 1).

    Item i is view (i % views) of video (i // views); a video's views start at different frames.
    Videos in `bad` stand for decode failures: the collate drops them and reports their ids.
    """

    def __init__(self, n_videos: int, views: int = 1, t: int = 4, size: int = 16, seed: int = 0, bad=()):
        self.n, self.views, self.t, self.size, self.seed, self.bad = n_videos, views, t, size, seed, set(bad)

    def __len__(self) -> int:
        return self.n * self.views

    def __getitem__(self, i: int) -> dict:
        vid, view = divmod(i, self.views)
        g = torch.Generator().manual_seed(self.seed * 100003 + vid)
        label = int(torch.randint(0, 2, (1,), generator=g))
        y0 = int(torch.randint(0, self.size - 4, (1,), generator=g))
        x0 = int(torch.randint(4, self.size - 8, (1,), generator=g))
        clip = torch.randint(0, 40, (3, self.t, self.size, self.size), generator=g, dtype=torch.uint8)
        step = 1 if label == 0 else -1
        for f in range(self.t):
            x = x0 + step * (f + view)
            clip[:, f, y0 : y0 + 4, max(0, x) : max(0, x + 4)] = 250
        return {"video": clip, "label": label, "video_id": vid, "view": view, "bad": vid in self.bad}


def collate(items: list[dict]) -> dict:
    good = [it for it in items if not it["bad"]]
    return {
        "video": torch.stack([it["video"] for it in good]) if good else torch.zeros(0, 3, 4, 16, 16, dtype=torch.uint8),
        "label": torch.tensor([it["label"] for it in good], dtype=torch.int64),
        "video_id": torch.tensor([it["video_id"] for it in good], dtype=torch.int64),
        "view": torch.tensor([it["view"] for it in good], dtype=torch.int64),
        "bad_video_ids": torch.tensor(sorted({it["video_id"] for it in items if it["bad"]}), dtype=torch.int64),
    }


class SquareData(pl.LightningDataModule):
    def __init__(self, n_train: int = 48, n_eval: int = 12, views: int = 2, batch_size: int = 8, bad=()) -> None:
        super().__init__()
        self.num_classes = 2
        self.class_names = ["right", "left"]
        self.train = MovingSquare(n_train, 1, seed=1)
        self.eval = MovingSquare(n_eval, views, seed=2, bad=bad)
        self.batch_size = batch_size

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, collate_fn=collate)

    def val_dataloader(self):
        return DataLoader(self.eval, batch_size=self.batch_size, collate_fn=collate)

    test_dataloader = val_dataloader
    predict_dataloader = val_dataloader


def lightning_cpu_trainer(tmp_path: Path, **kw) -> pl.Trainer:
    """Lightning's own Trainer on one CPU device, quiet, 3 epochs, logging every step (keywords override).

    `helpers.cli.cpu_trainer` is the same for vmm's Trainer subclass."""
    kw.setdefault("max_epochs", 3)
    return pl.Trainer(
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
        **kw,
    )


class LrRecorder(pl.Callback):
    """Records the learning rate of every parameter group at the start of each training step."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])
