"""Callbacks that `vmm` installs in the Trainers it builds (lightning_modules/cli.py).

- `StoreDataConfig` (every command): the datamodule's config and test views in every checkpoint
  (for `vmm predict` on files).
- `InterruptCheckpoint` (fit, demo): `interrupted.ckpt` on SIGTERM / Ctrl+C during a single-process fit.
- `TestRunSummary` (test, demo): prints how many views of each video the test averages, and how to
  lower it, before testing; the report files written, after.
- `DataTimeMonitor` (fit, demo): logs `train/data_time`, the share of training time spent waiting for
  the loader. In Python, pass `callbacks=[DataTimeMonitor()]` to a plain Trainer.

`TestReportWriter` and `PredictionWriter` (the report files) are in lightning_modules/reports.py.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .reports import TestReportWriter
from .step_timing import StepEventQueue, record_cuda_event, wait_share
from .trainer import INTERRUPTED_CKPT

__all__ = [
    "DATA_CONFIG_KEY",
    "PREDICT_SETTINGS_KEY",
    "DataTimeMonitor",
    "InterruptCheckpoint",
    "StoreDataConfig",
    "TestRunSummary",
]

# Checkpoint keys: the datamodule's config (class_path + init_args) and its test-view settings.
DATA_CONFIG_KEY = "vmm_data_config"
PREDICT_SETTINGS_KEY = "vmm_test_settings"


class StoreDataConfig(Callback):
    """Puts the datamodule's config (class_path + init_args) and its test-view settings into every
    checkpoint, so `vmm predict <files>` decodes new videos the way the model was tested."""

    def __init__(self, data_config: dict[str, Any] | None) -> None:
        self.data_config = data_config

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if self.data_config is not None:
            checkpoint[DATA_CONFIG_KEY] = self.data_config
        settings = getattr(trainer.datamodule, "test_settings", None)
        if isinstance(settings, dict):
            checkpoint[PREDICT_SETTINGS_KEY] = dict(settings)


class TestRunSummary(Callback):
    """Prints, before testing, how many videos are tested with how many views each (`test_clips` x
    `test_crops` of the datamodule: the paper protocols' 10 x 3 takes minutes on a CPU) and the
    options that lower it; after testing, the paths of the report files that the trainer's
    `reports.TestReportWriter` wrote (it must come before this callback in the list)."""

    __test__ = False  # not a pytest test class, despite the name

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        loaders = trainer.test_dataloaders
        loader = loaders[0] if isinstance(loaders, (list, tuple)) and loaders else loaders
        dataset = getattr(loader, "dataset", None)
        try:
            videos = f"{len(dataset)} videos"  # type: ignore[arg-type]
        except TypeError:  # a stream (shards) has no length
            videos = "the test videos"
        settings = getattr(trainer.datamodule, "test_settings", None)
        if not isinstance(settings, dict) or "test_clips" not in settings or "test_crops" not in settings:
            return
        clips, crops = settings["test_clips"], settings["test_crops"]
        line = f"[vmm] testing {videos} x {clips * crops} views each ({clips} clips x {crops} crops"
        if clips * crops > 1:
            line += (
                ": data.init_args.test_clips x test_crops; fewer views test faster, less accurately: "
                "--data.init_args.test_clips 1 --data.init_args.test_crops 1"
            )
        print(line + ")", flush=True)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        written = [str(p) for cb in trainer.callbacks if isinstance(cb, TestReportWriter) for p in cb.written]
        if written:
            print("[vmm] test report written: " + ", ".join(written), flush=True)


class InterruptCheckpoint(Callback):
    """On SIGTERM or Ctrl+C during a single-process `fit`, saves `interrupted.ckpt` beside the
    ModelCheckpoint files (Lightning's graceful shutdown saves nothing unless a ModelCheckpoint has
    save_on_exception), so the run resumes with `--ckpt_path .../interrupted.ckpt` from the step it
    reached. Not under DDP: saving is a collective there, and ranks interrupted at different points
    would wait on each other for ever; give a ModelCheckpoint `save_on_exception: true` instead."""

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        # Any stage of fit (its validation included), never the sanity check.
        if not isinstance(exception, (SIGTERMException, KeyboardInterrupt)) or trainer.state.fn != "fit":
            return
        if trainer.world_size > 1:
            return
        ckpt_cb = trainer.checkpoint_callback
        if ckpt_cb is None or not getattr(ckpt_cb, "dirpath", None) or trainer.sanity_checking:
            return
        path = Path(ckpt_cb.dirpath) / INTERRUPTED_CKPT
        trainer.save_checkpoint(path)
        rank_zero_info(f"[vmm] {type(exception).__name__}: saved {path} (step {trainer.global_step})")


class DataTimeMonitor(Callback):
    """Logs `train/data_time`: the share of training time spent waiting for the loader (between the
    end of one step and the start of the next, batch transfer included), a number in [0, 1] per
    micro-batch. High values: the run is input-bound (more loader workers, prepared data).

    CPU: each step timed by the host clock (the work is synchronous). CUDA: timed on the device by
    events on the current stream and read without ever blocking the host (`StepEventQueue`), so the
    value logged is that of the newest step the device has finished, usually one or two steps
    behind; nothing is logged while none has (the first step of a run, typically).
    """

    def __init__(self) -> None:
        self._step_end: float | None = None
        self._step_start: float | None = None
        self._device_steps = StepEventQueue()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._device_steps = StepEventQueue()  # no events of an earlier fit

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Each epoch's first step waits from here, not from the last step of the previous epoch
        # (that gap holds validation and checkpointing).
        if pl_module.device.type == "cuda":
            self._device_steps.restart(record_cuda_event(pl_module.device))
        else:
            self._step_end = time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Called after the batch is on the device (its transfer falls in the wait) and before the
        # step's work is enqueued.
        if pl_module.device.type == "cuda":
            self._device_steps.step_started(record_cuda_event(pl_module.device))
        else:
            self._step_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            self._device_steps.step_ended(record_cuda_event(pl_module.device))
            share = self._device_steps.newest_share()
            if share is None:
                return
        else:
            if self._step_start is None or self._step_end is None:
                return
            now = time.perf_counter()
            share = wait_share(self._step_start - self._step_end, now - self._step_start)
            self._step_end = now
        # A CPU tensor: `log` turns a Python number into a tensor on the module's device, a
        # blocking host-to-device copy on CUDA.
        pl_module.log("train/data_time", torch.tensor(share), on_step=True, on_epoch=False, batch_size=1)
