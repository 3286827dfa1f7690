"""Tiny end-to-end `vmm` settings shared by test_cli, test_ddp, test_cli_checkpoints, test_lr_scaling, ...

The synthetic motion dataset is generated once per test session into one directory (its cache
key is the generation parameters, so a second generation with the same parameters is a no-op).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import yaml
from lightning.pytorch import Callback

VMM = Path(sys.executable).with_name("vmm")
# The console script when vmm is installed; from a bare checkout on PYTHONPATH, the module it runs.
VMM_COMMAND = [str(VMM)] if VMM.is_file() else [sys.executable, "-m", "lightning_modules.cli"]

# 4 classes (2 time-reversal pairs), 6/2/3 videos per class, 8 frames of 32x32.
TINY_DATA = {
    "num_classes": 4,
    "train_per_class": 6,
    "val_per_class": 2,
    "test_per_class": 3,
    "video_frames": 8,
    "frame_size": 32,
    "speed_range": [1.0, 3.0],
    "generate_workers": 1,
    "batch_size": 4,
    "num_workers": 0,
    "num_frames": 8,
    "frame_interval": 1,
    "train_short_side": [32, 36],
    "eval_short_side": 32,
    "crop_size": 32,
    "test_clips": 2,
    "test_crops": 1,
}

TINY_SIFA = {
    "class_path": "lightning_modules.networks.SIFAResNet",
    "init_args": {
        "depth": 18,
        "width_mult": 0.125,
        "stem_temporal_kernel": 2,
        "stem_temporal_stride": 2,
        "dropout": 0.0,
    },
}

TINY_FCF = {
    "class_path": "lightning_modules.networks.FCFR2Plus1D",
    "init_args": {"depth": 18, "width_mult": 0.125, "fcf_bottleneck": 4, "fcf_n_iter": 2, "dropout": 0.0},
}


def tiny_config(root: Path, out_dir: Path, net: dict | None = None, **trainer) -> dict:
    """A full vmm config (trainer/model/data) for the tiny synthetic set under `root`."""
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "max_epochs": 2,
            "log_every_n_steps": 1,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "default_root_dir": str(out_dir),
            "callbacks": [
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {
                        "monitor": "val/top1",
                        "mode": "max",
                        "filename": "best-epoch{epoch:03d}",
                        "auto_insert_metric_name": False,
                    },
                },
                {
                    "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
                    "init_args": {"filename": "last", "enable_version_counter": False},
                },
            ],
            **trainer,
        },
        # copies: a caller may edit its config without changing the shared TINY_* dicts for later tests
        "model": {"net": copy.deepcopy(net or TINY_SIFA), "lr": 0.05, "warmup_epochs": 0.5, "weight_decay": 1e-4},
        "data": {
            "class_path": "datamodules.SyntheticMotionDataModule",
            "init_args": {"root": str(root), **copy.deepcopy(TINY_DATA)},
        },
    }


def write_config(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    return path


def generate_tiny_dataset(root: Path) -> Path:
    """Generate (once) the tiny synthetic set under `root`; returns the dataset's directory."""
    from datamodules import SyntheticMotionDataModule

    dm = SyntheticMotionDataModule(root=str(root), **{k: v for k, v in TINY_DATA.items()})
    dm.prepare_data()
    return Path(dm.root)


def run_vmm(args: list[str], cwd: Path, timeout: float = 300, gpu: bool = False) -> subprocess.CompletedProcess:
    """Run the installed console script in a subprocess (1 thread per process; GPUs hidden unless `gpu`)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if not gpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [*VMM_COMMAND, *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        timeout=timeout,
    )
    if proc.returncode != 0:
        raise AssertionError(
            f"vmm {' '.join(args)} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-6000:]}"
        )
    return proc


class ResumeProbe(Callback):
    """Records, when training starts, the step and copies of the optimizer and lr-scheduler states
    that `fit` resumed to (added by class_path in the resume test)."""

    def on_train_start(self, trainer, pl_module) -> None:
        self.global_step = trainer.global_step
        self.epoch = trainer.current_epoch
        self.optimizer_state = copy.deepcopy(trainer.optimizers[0].state_dict())
        self.scheduler_state = copy.deepcopy(trainer.lr_scheduler_configs[0].scheduler.state_dict())


def cpu_trainer(tmp_path: Path, **kw):
    """vmm's Trainer on one CPU device, quiet, writing under `tmp_path` (keyword arguments override)."""
    from lightning_modules.cli import VMMTrainer

    settings = {
        "default_root_dir": tmp_path,
        "accelerator": "cpu",
        "devices": 1,
        "enable_progress_bar": False,
        "enable_model_summary": False,
    }
    return VMMTrainer(**{**settings, **kw})
