"""Recipes that move between machines: `base_batch_size` (linear lr scaling to the actual global
batch) and the `train/data_time` input-bound monitor, in real Trainer runs; the scaling also in
real 2-process DDP (gloo) against 1 process through the `vmm` CLI.
"""

from __future__ import annotations

import csv
import time
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from helpers.cli import generate_tiny_dataset, run_vmm, tiny_config, write_config
from test_classifier import MovingSquare, SquareData, TinyNet, _LrRecorder, _trainer
from torch.utils.data import DataLoader

import ops
from lightning_modules import VideoClassifier


def _metrics(log_dir: Path) -> list[dict[str, str]]:
    with open(next(log_dir.rglob("metrics.csv"))) as fh:
        return list(csv.DictReader(fh))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key) not in (None, "")]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lr_scales_to_global_batch_and_is_logged(tmp_path, accumulate):
    # batch 4 x 1 device x accumulate; lr 0.4 was tuned for 16 clips per step.
    data = SquareData(n_train=16, n_eval=2, views=1, batch_size=4)
    net = TinyNet(2)
    net.flow = ops.FlowLayer(4, n_iter=1)  # flow-layer groups are scaled with the rest
    model = VideoClassifier(net, lr=0.4, min_lr=0.04, base_batch_size=16, scheduler="constant", flow_lr_scale=0.01)
    rec = _LrRecorder()
    trainer = _trainer(
        tmp_path,
        max_epochs=1,
        callbacks=[rec],
        enable_checkpointing=False,
        limit_val_batches=0,
        accumulate_grad_batches=accumulate,
    )
    trainer.fit(model, datamodule=data)
    scale = 4 * accumulate / 16
    assert model.lr_scale == pytest.approx(scale)
    flow_ids = {id(p) for p in net.flow.parameters()}
    for group in trainer.optimizers[0].param_groups:
        is_flow = id(group["params"][0]) in flow_ids
        assert group["lr"] == pytest.approx(0.4 * scale * (0.01 if is_flow else 1.0))
    assert rec.lrs[0][0] == pytest.approx(0.4 * scale)
    rows = _metrics(tmp_path)
    assert _column(rows, "lr_base") == pytest.approx([0.4] * len(_column(rows, "lr_base")))
    assert _column(rows, "lr_peak") == pytest.approx([0.4 * scale] * len(_column(rows, "lr_peak")))
    assert _column(rows, "lr") == pytest.approx([0.4 * scale] * len(_column(rows, "lr")))


def test_resume_with_another_global_batch_rescales(tmp_path):
    def fit(batch_size: int, epochs: int, ckpt=None) -> tuple[VideoClassifier, _LrRecorder, pl.Trainer]:
        data = SquareData(n_train=16, n_eval=2, views=1, batch_size=batch_size)
        model = VideoClassifier(TinyNet(2), lr=0.4, base_batch_size=16, scheduler="constant")
        rec = _LrRecorder()
        trainer = _trainer(
            tmp_path, max_epochs=epochs, callbacks=[rec], logger=False, limit_val_batches=0, enable_checkpointing=False
        )
        trainer.fit(model, datamodule=data, ckpt_path=ckpt)
        return model, rec, trainer

    _, rec, trainer = fit(batch_size=4, epochs=1)
    assert rec.lrs[0][0] == pytest.approx(0.1)
    trainer.save_checkpoint(tmp_path / "e1.ckpt")
    # Resumed with twice the batch: the restored schedule is re-scaled from the first resumed step.
    model, rec, trainer = fit(batch_size=8, epochs=2, ckpt=tmp_path / "e1.ckpt")
    assert model.lr_scale == pytest.approx(0.5)
    assert [r[0] for r in rec.lrs] == pytest.approx([0.2] * len(rec.lrs))
    assert trainer.lr_scheduler_configs[0].scheduler.base_lrs[0] == pytest.approx(0.2)


def test_no_base_batch_size_means_no_scaling(tmp_path):
    data = SquareData(n_train=8, n_eval=2, views=1, batch_size=4)
    model = VideoClassifier(TinyNet(2), lr=0.3, scheduler="constant")
    trainer = _trainer(
        tmp_path, max_epochs=1, logger=False, enable_checkpointing=False, limit_val_batches=0, accumulate_grad_batches=2
    )
    trainer.fit(model, datamodule=data)
    assert model.lr_scale == 1.0
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.3)
    with pytest.raises(ValueError, match="base_batch_size"):
        VideoClassifier(TinyNet(2), base_batch_size=0)


def test_lr_scaling_with_a_plain_dataloader(tmp_path):
    # No datamodule: the per-device batch comes from the train DataLoader.
    from test_classifier import collate

    loader = DataLoader(MovingSquare(8), batch_size=2, collate_fn=collate)
    model = VideoClassifier(TinyNet(2), lr=0.1, base_batch_size=8, scheduler="constant")
    trainer = _trainer(tmp_path, max_epochs=1, logger=False, enable_checkpointing=False)
    trainer.fit(model, train_dataloaders=loader)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.1 * 2 / 8)


class _SlowSquares(MovingSquare):
    """MovingSquare whose items take `delay` seconds to load (an input-bound loader)."""

    def __init__(self, *args, delay: float, **kw) -> None:
        super().__init__(*args, **kw)
        self.delay = delay

    def __getitem__(self, i: int) -> dict:
        time.sleep(self.delay)
        return super().__getitem__(i)


def test_data_time_is_logged_in_unit_range_and_sees_a_slow_loader(tmp_path):
    from test_classifier import collate

    shares = {}
    for name, delay in (("fast", 0.0), ("slow", 0.25)):
        loader = DataLoader(_SlowSquares(12, delay=delay), batch_size=4, collate_fn=collate)
        model = VideoClassifier(TinyNet(2), lr=0.1)
        out = tmp_path / name
        trainer = _trainer(out, max_epochs=2, enable_checkpointing=False)
        trainer.fit(model, train_dataloaders=loader)
        shares[name] = _column(_metrics(out), "train/data_time")
        assert len(shares[name]) == 6  # every step of both epochs
        assert all(0.0 <= s <= 1.0 for s in shares[name]), shares[name]
    # 4 items x 250 ms per batch against a tiny Conv3d step (tens of ms, more on a busy machine).
    mean = {name: sum(v) / len(v) for name, v in shares.items()}
    assert mean["slow"] > 0.5 and mean["slow"] > mean["fast"] + 0.2, shares
    model = VideoClassifier(TinyNet(2), log_data_time=False)
    out = tmp_path / "off"
    _trainer(out, max_epochs=1, enable_checkpointing=False).fit(model, train_dataloaders=loader)
    assert not _column(_metrics(out), "train/data_time")


@pytest.mark.slow
def test_ddp_two_processes_see_the_same_lr_per_sample(tmp_path_factory, tmp_path):
    """The same config (lr 0.05 for 8 clips per step) on 1 and on 2 gloo processes, batch 4 each."""
    root = tmp_path_factory.getbasetemp() / "vmm_synthetic"
    generate_tiny_dataset(root)
    cfg = tiny_config(root, tmp_path / "runs", max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    cfg["model"]["base_batch_size"] = 8
    cfg["model"]["scheduler"] = "constant"
    config = write_config(tmp_path / "tiny.yaml", cfg)
    per_sample = {}
    for procs in (1, 2):
        out = tmp_path / f"p{procs}"
        extra = ["--trainer.strategy", "ddp", "--trainer.accelerator", "cpu"] if procs > 1 else []
        run_vmm(
            [
                "fit",
                "--config",
                str(config),
                "--trainer.devices",
                str(procs),
                "--trainer.default_root_dir",
                str(out),
                *extra,
            ],
            cwd=tmp_path,
        )
        ckpt = torch.load(next(out.rglob("last.ckpt")), map_location="cpu", weights_only=True)
        base_lrs = ckpt["lr_schedulers"][0]["base_lrs"]  # the peak lrs the optimizer ran with
        global_batch = 4 * procs
        assert base_lrs[0] == pytest.approx(0.05 * global_batch / 8)
        assert _column(_metrics(out), "lr_peak")[0] == pytest.approx(base_lrs[0])
        per_sample[procs] = [lr / global_batch for lr in base_lrs]
    assert per_sample[2] == pytest.approx(per_sample[1])


PAPER_CONFIGS = {  # config: (lr, base_batch_size) of its recipe
    "sifa_r50_kinetics400.yaml": (0.04, 384),
    "c2d_r50_kinetics400.yaml": (0.04, 384),
    "fcf_r2plus1d50_kinetics400.yaml": (0.1, 128),
    "r2plus1d50_kinetics400.yaml": (0.1, 128),
    "fcf_r2plus1d50_hmdb51.yaml": (0.01, 24),
    "r2plus1d50_hmdb51.yaml": (0.01, 24),
    "sifa_r50_ssv1.yaml": (0.02, 64),
    "sifa_r50_ssv2.yaml": (0.02, 64),
    "c2d_r50_ssv1.yaml": (0.02, 64),
    "c2d_r50_ssv2.yaml": (0.02, 64),
    "fcf_r2plus1d50_ssv2.yaml": (0.1, 128),
}


@pytest.mark.parametrize("name", sorted(PAPER_CONFIGS))
def test_paper_configs_state_the_recipe_lr_and_its_batch(name):
    import yaml
    from helpers import REPO_ROOT

    model = yaml.safe_load((REPO_ROOT / "configs" / name).read_text())["model"]
    assert (model["lr"], model["base_batch_size"]) == PAPER_CONFIGS[name]
    if name.endswith("r50_kinetics400.yaml"):  # the released SIFA Kinetics colour augmentation
        assert model["color_jitter"] == [0.4, 0.4, 0.4, 0.1]
        assert (model["color_jitter_p"], model["grayscale_p"], model["blur_p"]) == (0.8, 0.2, 0.5)
    if "r50_ssv" in name:  # the released SIFA SSv1 recipe's RandAugment, kept for SSv2
        assert model["rand_augment"] == [2, 27]
