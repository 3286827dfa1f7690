"""VideoClassifier: normalisation, losses, schedule, evaluation aggregation and real Trainer runs.

The network here is a tiny Conv3d classifier with two heads built in this file (the real
networks are exercised end to end in test_cli.py); the data are small in-memory clips of a bright
square moving left or right, so a working training loop must learn them.
"""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from lightning_modules import VideoClassifier
from lightning_modules.classifier import _EvalAccumulator


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


def _trainer(tmp_path, **kw) -> pl.Trainer:
    kw.setdefault("max_epochs", 3)
    return pl.Trainer(
        default_root_dir=tmp_path, accelerator="cpu", devices=1, enable_progress_bar=False,
        enable_model_summary=False, log_every_n_steps=1, **kw,
    )


# ---------------------------------------------------------------------------- construction / input


def test_rejects_bad_arguments():
    with pytest.raises(TypeError, match="forward_heads"):
        VideoClassifier(nn.Linear(2, 2), num_classes=2)
    with pytest.raises(ValueError, match="class_names"):
        VideoClassifier(TinyNet(3), class_names=["a", "b"])
    with pytest.raises(ValueError, match="optimizer"):
        VideoClassifier(TinyNet(3), optimizer="adam")
    with pytest.raises(ValueError, match="min_lr"):
        VideoClassifier(TinyNet(3), lr=0.1, min_lr=0.2)
    with pytest.raises(ValueError, match="mean and std"):
        VideoClassifier(TinyNet(3), std=(0.2, 0.2))
    assert VideoClassifier(TinyNet(3)).num_classes == 3  # taken from net.num_classes


def test_normalize_uint8_on_device():
    model = VideoClassifier(TinyNet(2), mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    video = torch.tensor([0, 255, 51], dtype=torch.uint8).view(1, 1, 1, 1, 3).expand(2, 3, 2, 1, 3)
    x = model._video({"video": video.clone(), "label": torch.zeros(2)})
    assert x.dtype == torch.float32 and x.shape == (2, 3, 2, 1, 3)
    torch.testing.assert_close(x[0, 0, 0, 0], torch.tensor([-1.0, 1.0, -0.6]))
    torch.testing.assert_close(x[0, 1, 0, 0], torch.tensor([-1.0, 3.0, -0.2]))
    torch.testing.assert_close(x[0, 2, 0, 0], torch.tensor([0.0, 1.0, 0.2]))
    with pytest.raises(TypeError, match=r"uint8.*torch.float32.*\(2, 3, 2, 1, 3\)"):
        model.normalize(x)
    with pytest.raises(ValueError, match=r"\[N,3,T,H,W\].*\(3, 2, 1, 3\)"):
        model.normalize(video[0])


def test_loss_is_sum_over_heads_and_forward_is_log_mean_softmax():
    net = TinyNet(4, heads=2)
    model = VideoClassifier(net, label_smoothing=0.1).eval()
    x = torch.randn(3, 3, 4, 8, 8)
    y = torch.tensor([0, 3, 1])
    heads = net.forward_heads(x)
    expect = sum(nn.functional.cross_entropy(h, y, label_smoothing=0.1) for h in heads)
    torch.testing.assert_close(model._loss(heads, y), expect)
    torch.testing.assert_close(model(x).exp(), model._probs(heads))


# ---------------------------------------------------------------------------- evaluation aggregation


def test_eval_accumulator_averages_views_dedupes_and_counts_excluded():
    acc = _EvalAccumulator()
    p = torch.tensor
    # video 0 (label 1): two views whose mean favours class 1; view 1 seen twice (sampler padding).
    acc.add(p([0, 0]), p([0, 1]), p([1, 1]), p([[0.6, 0.4, 0.0], [0.0, 0.9, 0.1]]), p([1.0, 2.0]))
    acc.add(p([0, 2]), p([1, 0]), p([1, 2]), p([[0.0, 0.9, 0.1], [0.2, 0.5, 0.3]]), p([2.0, 3.0]))
    acc.add_bad(p([5, 2]))  # 2 failed in one view only: still evaluated; 5 is excluded
    res = acc.compute(num_classes=3, top_k=2)
    assert res["num_videos"] == 2 and res["num_clips"] == 3 and res["excluded_videos"] == 1
    assert res["top1"] == 0.5  # video 0 right (mean [.3,.65,.05]), video 2 wrong (argmax 1, label 2)
    assert res["top5"] == 1.0  # top-2: class 2 is second for video 2
    assert res["clip_top1"] == pytest.approx(1 / 3)
    assert res["mean_class"] == 0.5
    assert res["loss"] == pytest.approx(2.0)
    torch.testing.assert_close(res.confusion, p([[0, 0, 0], [0, 1, 0], [0, 1, 0]]))


# ---------------------------------------------------------------------------- Trainer runs


def test_fit_test_predict_learns_and_writes_reports(tmp_path):
    data = SquareData(bad=(3,))
    model = VideoClassifier(TinyNet(2), lr=0.5, warmup_epochs=0.5, weight_decay=1e-4)
    trainer = _trainer(tmp_path, max_epochs=4)
    trainer.fit(model, datamodule=data)
    assert model.class_names == ["right", "left"]  # taken from the datamodule at setup
    val = model.last_eval["val"]
    assert val["num_videos"] == 11 and val["num_clips"] == 22 and val["excluded_videos"] == 1
    assert "val/top1" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics

    trainer.test(model, datamodule=data, verbose=False)
    res = model.last_eval["test"]
    assert res["top1"] >= 0.8, res  # chance is 0.5
    log_dir = tmp_path / "lightning_logs" / "version_0"
    report = json.loads((log_dir / "test_results.json").read_text())
    assert report["num_videos"] == 11 and report["excluded_videos"] == 1
    assert (log_dir / "confusion_matrix_test.png").stat().st_size > 0
    assert (log_dir / "confusion_matrix_test.csv").read_text().startswith("true\\pred,right,left")

    outs = trainer.predict(model, datamodule=data)
    assert sum(len(o["video_id"]) for o in outs) >= 11
    first = outs[0]
    assert first["topk_ids"].shape == (len(first["video_id"]), 2)
    assert first["topk_names"][0][0] in ("right", "left")
    torch.testing.assert_close(first["probs"].sum(1), torch.ones(len(first["video_id"])))
    assert bool((first["num_views"] == 2).all())

    # class names survive a checkpoint round trip (the net is given again when built in Python)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = VideoClassifier.load_from_checkpoint(ckpt, net=TinyNet(2))
    assert loaded.class_names == ["right", "left"]
    torch.testing.assert_close(loaded.net.fcs[0].weight, model.net.fcs[0].weight)


def test_bf16_mixed_on_cpu(tmp_path):
    data = SquareData(n_train=16, n_eval=4, views=1)
    model = VideoClassifier(TinyNet(2), lr=0.05, optimizer="adamw")
    trainer = _trainer(tmp_path, max_epochs=1, precision="bf16-mixed", logger=False, enable_checkpointing=False)
    trainer.fit(model, datamodule=data)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert model.last_eval["val"]["num_videos"] == 4


class _LrRecorder(pl.Callback):
    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])


def test_warmup_cosine_per_iteration_and_no_decay_groups(tmp_path):
    data = SquareData(n_train=16, n_eval=2, views=1, batch_size=4)  # 4 steps per epoch
    model = VideoClassifier(TinyNet(2), lr=0.1, min_lr=0.01, warmup_epochs=1, weight_decay=1e-3, nesterov=True)
    rec = _LrRecorder()
    trainer = _trainer(tmp_path, max_epochs=3, callbacks=[rec], logger=False, enable_checkpointing=False,
                       limit_val_batches=0)
    trainer.fit(model, datamodule=data)
    lrs = [r[0] for r in rec.lrs]
    assert len(lrs) == 12
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])
    # cosine over the remaining 8 steps, from 0.1 towards 0.01
    for s in range(4, 12):
        expect = 0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 8))
        assert lrs[s] == pytest.approx(expect)
    opt = trainer.optimizers[0]
    assert opt.defaults["nesterov"] is True
    decays = {g["weight_decay"]: sum(p.numel() for p in g["params"]) for g in opt.param_groups}
    n_low = sum(p.numel() for p in model.net.parameters() if p.ndim <= 1)
    assert decays == {0.0: n_low, 1e-3: sum(p.numel() for p in model.net.parameters()) - n_low}


def test_flow_layer_parameters_get_their_own_lr():
    import ops

    net = TinyNet(2)
    net.flow = ops.FlowLayer(4, n_iter=1)
    model = VideoClassifier(net, lr=0.2, flow_lr_scale=0.01, weight_decay=1e-4)
    groups = model.param_groups()
    flow_ids = {id(p) for p in net.flow.parameters()}
    for g in groups:
        is_flow = {id(p) in flow_ids for p in g["params"]}
        assert len(is_flow) == 1  # a group is all flow or all non-flow
        assert g["lr"] == pytest.approx(0.002 if is_flow.pop() else 0.2)
        assert g["weight_decay"] == (1e-4 if all(p.ndim > 1 for p in g["params"]) else 0.0)
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert {id(p) for g in groups for p in g["params"] if g["lr"] < 0.1} == flow_ids
