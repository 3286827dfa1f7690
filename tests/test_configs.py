"""Every YAML in configs/ parses and builds: datamodule, network (num_classes linked from the data),
classifier and trainer.

The datasets of the paper configs are not here, so the test writes their annotation layout (the
real class count, no videos) into a temporary root: that is all building needs. Trainer settings
that need GPUs are swapped for CPU ones; the rest of each config is built as written.
"""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import pytest
import yaml
from helpers import REPO_ROOT

import ops
from lightning_modules import VideoClassifier
from lightning_modules.cli import VMMCLI
from lightning_modules.networks import FCFR2Plus1D, SIFAResNet

CONFIGS = sorted((REPO_ROOT / "configs").glob("*.yaml"))
CPU = [
    "--trainer.accelerator",
    "cpu",
    "--trainer.devices",
    "1",
    "--trainer.strategy",
    "auto",
    "--trainer.precision",
    "32-true",
]


def _fake_kinetics(root: Path, k: int = 400) -> None:
    ann = root / "annotations"
    ann.mkdir(parents=True)
    for split in ("train", "validate", "test"):
        with open(ann / f"{split}.csv", "w", encoding="utf-8", newline="") as fh:
            w = csv.writer(fh)
            w.writerow(["label", "youtube_id", "time_start", "time_end", "split"])
            for i in range(k):
                w.writerow([f"action {i:03d}", f"vid{split}{i:05d}", 0, 10, split])


def _fake_hmdb51(root: Path, k: int = 51) -> None:
    ann = root / "testTrainMulti_7030_splits"
    ann.mkdir(parents=True)
    for i in range(k):
        (ann / f"class_{i:02d}_test_split1.txt").write_text(f"a{i}.avi 1\nb{i}.avi 2\nc{i}.avi 0\n", encoding="utf-8")


def _fake_ssv2(root: Path) -> None:
    # the real 174 class names (tests/fixtures) and one entry per split; no videos
    labels = root / "labels"
    labels.mkdir(parents=True)
    names = json.loads(
        (REPO_ROOT / "tests" / "fixtures" / "something_something_v2_labels.json").read_text(encoding="utf-8")
    )
    (labels / "labels.json").write_text(json.dumps(names), encoding="utf-8")
    entry = {"id": "1", "label": "holding a cup", "template": "Holding [something]", "placeholders": ["a cup"]}
    for split in ("train", "validation"):
        (labels / f"{split}.json").write_text(json.dumps([entry]), encoding="utf-8")
    (labels / "test.json").write_text(json.dumps([{"id": "2"}]), encoding="utf-8")


def _fake_ssv1(root: Path, k: int = 174) -> None:
    root.mkdir(parents=True)
    (root / "something-something-v1-labels.csv").write_text(
        "".join(f"Doing something {i}\n" for i in range(k)), encoding="utf-8"
    )
    for split in ("train", "validation"):
        (root / f"something-something-v1-{split}.csv").write_text("1;Doing something 3\n", encoding="utf-8")


def test_every_config_is_covered():
    names = {p.name for p in CONFIGS}
    assert {
        "demo_sifa_synthetic.yaml",
        "demo_fcf_synthetic.yaml",
        "sifa_r50_kinetics400.yaml",
        "c2d_r50_kinetics400.yaml",
        "fcf_r2plus1d50_hmdb51.yaml",
        "r2plus1d50_hmdb51.yaml",
        "fcf_r2plus1d50_kinetics400.yaml",
        "r2plus1d50_kinetics400.yaml",
        "sifa_r50_ssv1.yaml",
        "sifa_r50_ssv2.yaml",
        "c2d_r50_ssv1.yaml",
        "c2d_r50_ssv2.yaml",
        "fcf_r2plus1d50_ssv2.yaml",
    } <= names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_builds(config, tmp_path):
    raw = yaml.safe_load(config.read_text(encoding="utf-8"))
    data_cls = raw["data"]["class_path"].rsplit(".", 1)[1]
    args = ["--config", str(config), *CPU, "--trainer.default_root_dir", str(tmp_path)]
    expect_k = {
        "KineticsDataModule": 400,
        "HMDB51DataModule": 51,
        "SomethingSomethingV1DataModule": 174,
        "SomethingSomethingV2DataModule": 174,
    }.get(data_cls)
    if data_cls == "KineticsDataModule":
        _fake_kinetics(tmp_path / "data")
    elif data_cls == "SomethingSomethingV2DataModule":
        _fake_ssv2(tmp_path / "data")
    elif data_cls == "SomethingSomethingV1DataModule":
        _fake_ssv1(tmp_path / "data")
    elif data_cls == "HMDB51DataModule":
        _fake_hmdb51(tmp_path / "data")
    else:
        assert data_cls == "SyntheticMotionDataModule"
        expect_k = raw["data"]["init_args"].get("num_classes", 8)
        # The demo runs on a CPU as written; building its data does not generate videos.
        args = ["--config", str(config), "--trainer.default_root_dir", str(tmp_path)]
    if data_cls != "SyntheticMotionDataModule":
        args += ["--data.init_args.root", str(tmp_path / "data")]

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter.*")
        cli = VMMCLI(args=args, run=False)
    model, dm = cli.model, cli.datamodule
    assert isinstance(model, VideoClassifier)
    assert dm.num_classes == model.num_classes == model.net.num_classes == expect_k
    assert model.class_names == dm.class_names
    net_name = raw["model"]["net"]["class_path"].rsplit(".", 1)[1]
    net_cls = {"SIFAResNet": SIFAResNet, "FCFR2Plus1D": FCFR2Plus1D}[net_name]
    assert type(model.net) is net_cls
    init = raw["model"]["net"].get("init_args", {})
    assert model.net.depth == init["depth"]
    n_sifa = sum(isinstance(m, ops.SIFA) for m in model.net.modules())
    n_fcf = sum(isinstance(m, ops.FCFBlock) for m in model.net.modules())
    if net_cls is SIFAResNet:
        assert (n_sifa > 0) == init.get("sifa", True) and n_fcf == 0
        assert model.net.dual_path == init.get("dual_path", True)
    else:
        assert (n_fcf > 0) == init.get("fcf", True) and n_sifa == 0
        assert model.net.temporal == init.get("temporal", True)
    # the optimizer groups build (lr/decay per group) without a Trainer
    groups = model.param_groups()
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.net.parameters() if p.requires_grad])
    if raw["model"].get("flow_lr_scale", 1.0) != 1.0 and n_fcf:
        assert len({g["lr"] for g in groups}) == 2
    assert cli.trainer.max_epochs == raw["trainer"]["max_epochs"]
    if data_cls.startswith("SomethingSomething"):
        assert not dm.train_transform.flip and dm.dataset("train").flip_labels is None
        assert dm.clip.sampling == "segment"
