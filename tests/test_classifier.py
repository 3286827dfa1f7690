"""VideoClassifier: normalisation, losses, schedule, evaluation aggregation and real Trainer runs.

The network here is the tiny two-head Conv3d classifier of helpers/classifier.py (the real
networks are exercised end to end in test_cli.py); the data are its small in-memory clips of a
bright square moving left or right, so a working training loop must learn them.
"""

from __future__ import annotations

import json
import math

import lightning.pytorch as pl
import pytest
import torch
from helpers.classifier import LrRecorder, SquareData, TinyNet, lightning_cpu_trainer
from torch import nn

from lightning_modules import VideoClassifier
from lightning_modules.reports import TestReportWriter

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


# ---------------------------------------------------------------------------- Trainer runs


def test_fit_test_predict_learns_and_writes_reports(tmp_path):
    data = SquareData(bad=(3,))
    model = VideoClassifier(TinyNet(2), lr=0.5, warmup_epochs=0.5, weight_decay=1e-4)
    trainer = lightning_cpu_trainer(tmp_path, max_epochs=4, callbacks=[TestReportWriter()])
    trainer.fit(model, datamodule=data)
    assert model.class_names == ["right", "left"]  # taken from the datamodule at setup
    val = model.last_eval["val"]
    assert val["num_videos"] == 11 and val["num_clips"] == 22 and val["excluded_videos"] == 1
    assert "val/top1" in trainer.callback_metrics and "train/loss" in trainer.callback_metrics

    trainer.test(model, datamodule=data, verbose=False)
    res = model.last_eval["test"]
    assert res["top1"] >= 0.8, res  # chance is 0.5
    log_dir = tmp_path / "lightning_logs" / "version_0"
    report = json.loads((log_dir / "test_results.json").read_text(encoding="utf-8"))
    assert report["num_videos"] == 11 and report["excluded_videos"] == 1
    assert (log_dir / "confusion_matrix_test.png").stat().st_size > 0
    assert (log_dir / "confusion_matrix_test.csv").read_text(encoding="utf-8").startswith("true\\pred,right,left")
    scores = json.loads((log_dir / "scores_test.json").read_text(encoding="utf-8"))
    assert scores["class_names"] == ["right", "left"] and scores["excluded_video_ids"] == [3]
    assert [v["video_id"] for v in scores["videos"]] == [v for v in range(12) if v != 3]
    assert all(v["num_views"] == 2 and v["name"] is None for v in scores["videos"])  # no records(): no names
    assert [v["label"] for v in scores["videos"]] == [int(data.eval[2 * v]["label"]) for v in range(12) if v != 3]
    hits = [max(range(2), key=v["probs"].__getitem__) == v["label"] for v in scores["videos"]]
    assert sum(hits) / len(hits) == pytest.approx(res["top1"])

    outs = trainer.predict(model, datamodule=data)
    assert sum(len(o["video_id"]) for o in outs) >= 11
    first = outs[0]
    assert first["topk_ids"].shape == (len(first["video_id"]), 2)
    assert first["topk_names"][0][0] in ("right", "left")
    torch.testing.assert_close(first["probs"].sum(1), torch.ones(len(first["video_id"])))
    assert bool((first["num_views"] == 2).all())
    # Prediction and test average the views with the same function: the same probabilities.
    by_id = {v["video_id"]: v["probs"] for v in scores["videos"]}
    for o in outs:
        for vid, probs in zip(o["video_id"].tolist(), o["probs"], strict=True):
            torch.testing.assert_close(probs, torch.tensor(by_id[vid]), rtol=1e-5, atol=1e-6)

    # Without the report callback the module writes no file (reports are not its job).
    bare = pl.Trainer(
        default_root_dir=tmp_path / "bare",
        accelerator="cpu",
        devices=1,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    bare.test(model, datamodule=data, verbose=False)
    assert bare.log_dir is not None and not any((tmp_path / "bare").rglob("*.json"))
    assert model.last_eval["test"]["top1"] == pytest.approx(res["top1"])

    # class names survive a checkpoint round trip (the net is given again when built in Python)
    ckpt = tmp_path / "m.ckpt"
    trainer.save_checkpoint(ckpt)
    loaded = VideoClassifier.load_from_checkpoint(ckpt, net=TinyNet(2))
    assert loaded.class_names == ["right", "left"]
    torch.testing.assert_close(loaded.net.fcs[0].weight, model.net.fcs[0].weight)


def test_bf16_mixed_on_cpu(tmp_path):
    data = SquareData(n_train=16, n_eval=4, views=1)
    model = VideoClassifier(TinyNet(2), lr=0.05, optimizer="adamw")
    trainer = lightning_cpu_trainer(
        tmp_path, max_epochs=1, precision="bf16-mixed", logger=False, enable_checkpointing=False
    )
    trainer.fit(model, datamodule=data)
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    assert model.last_eval["val"]["num_videos"] == 4


def test_bf16_true_feeds_the_network_its_own_dtype(tmp_path):
    # "bf16-true" casts weights and buffers to bf16 but not the uint8 batch: normalize must follow the module.
    data = SquareData(n_train=16, n_eval=4, views=1)
    model = VideoClassifier(TinyNet(2), lr=0.05, optimizer="adamw")
    trainer = lightning_cpu_trainer(
        tmp_path, max_epochs=1, precision="bf16-true", logger=False, enable_checkpointing=False
    )
    trainer.fit(model, datamodule=data)
    assert model.normalize(torch.zeros(1, 3, 2, 4, 4, dtype=torch.uint8)).dtype == torch.bfloat16
    assert math.isfinite(float(trainer.callback_metrics["train/loss"]))
    trainer.test(model, datamodule=data, verbose=False)
    assert model.last_eval["test"]["num_videos"] == 4


def test_warmup_cosine_per_iteration_and_no_decay_groups(tmp_path):
    data = SquareData(n_train=16, n_eval=2, views=1, batch_size=4)  # 4 steps per epoch
    model = VideoClassifier(TinyNet(2), lr=0.1, min_lr=0.01, warmup_epochs=1, weight_decay=1e-3, nesterov=True)
    rec = LrRecorder()
    trainer = lightning_cpu_trainer(
        tmp_path, max_epochs=3, callbacks=[rec], logger=False, enable_checkpointing=False, limit_val_batches=0
    )
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


class DeclaredGroupNet(TinyNet):
    """TinyNet that names its second head "flow": the classifier must take the network's word for it."""

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"flow": list(self.fcs[1].parameters())}


def test_the_network_declares_which_parameters_get_flow_lr_scale():
    net = DeclaredGroupNet(2)
    model = VideoClassifier(net, lr=0.2, flow_lr_scale=0.1)
    lrs = {id(p): g["lr"] for g in model.param_groups() for p in g["params"]}
    declared = {id(p) for p in net.fcs[1].parameters()}
    assert {i for i, lr in lrs.items() if lr == pytest.approx(0.02)} == declared
    assert len(lrs) == len(list(net.parameters()))
    # flow_lr_scale 1 (the default): one lr for all
    assert {g["lr"] for g in VideoClassifier(DeclaredGroupNet(2), lr=0.2).param_groups()} == {0.2}


def test_real_networks_declare_their_flow_group():
    import ops
    from lightning_modules.networks import FLOW_GROUP, FCFR2Plus1D, SIFAResNet, parameter_groups

    fcf = FCFR2Plus1D(2, depth=18, width_mult=0.125, fcf_bottleneck=4, fcf_n_iter=1)
    flow = {id(p) for m in fcf.modules() if isinstance(m, ops.FlowLayer) for p in m.parameters()}
    assert flow and {id(p) for p in fcf.parameter_groups()[FLOW_GROUP]} == flow
    assert {id(p) for p in parameter_groups(fcf)[FLOW_GROUP]} == flow
    # The FCF blocks' convolutions are not flow parameters.
    assert {id(p) for p in fcf.fcf.parameters()} - flow
    assert parameter_groups(FCFR2Plus1D(2, depth=18, width_mult=0.125, fcf=False)) == {}
    assert parameter_groups(SIFAResNet(2, depth=18, width_mult=0.125, sifa=False)) == {}
    model = VideoClassifier(fcf, lr=0.1, flow_lr_scale=0.01)
    assert {id(p) for g in model.param_groups() if g["lr"] == pytest.approx(0.001) for p in g["params"]} == flow


def test_a_parameter_in_two_declared_groups_is_an_error():
    from lightning_modules.networks import parameter_groups

    class Twice(TinyNet):
        def parameter_groups(self):
            return {"flow": list(self.fcs[0].parameters()), "other": [self.fcs[0].weight]}

    with pytest.raises(ValueError, match=r"Twice.parameter_groups\(\): a parameter is in both 'flow' and 'other'"):
        parameter_groups(Twice(2))
