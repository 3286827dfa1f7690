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
from collections import deque
from pathlib import Path
from typing import Any, Protocol

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from .reports import TestReportWriter
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
    events on the current stream and read without ever blocking the host (`_StepEventQueue`), so the
    value logged is that of the newest step the device has finished, usually one or two steps
    behind; nothing is logged while none has (the first step of a run, typically).
    """

    def __init__(self) -> None:
        self._step_end: float | None = None
        self._step_start: float | None = None
        self._device_steps = _StepEventQueue()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._device_steps = _StepEventQueue()  # no events of an earlier fit

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Each epoch's first step waits from here, not from the last step of the previous epoch
        # (that gap holds validation and checkpointing).
        if pl_module.device.type == "cuda":
            self._device_steps.restart(_record_cuda_event(pl_module.device))
        else:
            self._step_end = time.perf_counter()

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Called after the batch is on the device (its transfer falls in the wait) and before the
        # step's work is enqueued.
        if pl_module.device.type == "cuda":
            self._device_steps.step_started(_record_cuda_event(pl_module.device))
        else:
            self._step_start = time.perf_counter()

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if pl_module.device.type == "cuda":
            self._device_steps.step_ended(_record_cuda_event(pl_module.device))
            share = self._device_steps.newest_share()
            if share is None:
                return
        else:
            if self._step_start is None or self._step_end is None:
                return
            now = time.perf_counter()
            share = _wait_share(self._step_start - self._step_end, now - self._step_start)
            self._step_end = now
        # A CPU tensor: `log` turns a Python number into a tensor on the module's device, a
        # blocking host-to-device copy on CUDA.
        pl_module.log("train/data_time", torch.tensor(share), on_step=True, on_epoch=False, batch_size=1)


def _record_cuda_event(device: torch.device) -> torch.cuda.Event:
    """A timing event recorded on `device`'s current stream (the step's stream)."""
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


class _TimingEvent(Protocol):
    """What `_StepEventQueue` needs of an event (torch.cuda.Event with enable_timing=True has it)."""

    def query(self) -> bool: ...

    def elapsed_time(self, end_event: Any) -> float: ...


def _wait_share(wait: float, step: float) -> float:
    """`train/data_time` of one step: the wait for its input over wait + step, in [0, 1] (negative clock
    differences count as 0)."""
    wait, step = max(0.0, wait), max(0.0, step)
    return wait / max(wait + step, 1e-12)


class _StepEventQueue:
    """`train/data_time` of steps timed by device events, read without ever blocking the host.

    Per step, three events recorded in stream order: the previous step's end (or the epoch start, see
    `restart`), this step's start (batch already on the device, no step work enqueued yet) and its
    end. On the device timeline, previous end -> start is the time the stream sat idle waiting for
    the host (loader, batch transfer, host overhead) and start -> end the step's device time;
    data_time = idle / (idle + step). A step's events complete when the device gets to them, so
    `newest_share` polls them with `query()` (non-blocking), oldest step first, and returns the
    newest step whose three events have all completed; `elapsed_time` is only ever called on
    completed events. At most `capacity` steps wait to complete; a step ended while the queue is
    full is not measured (the host that far ahead is rare; dropping the newest rather than the
    oldest keeps measurements coming).

    The events are not copied: a copy (deepcopy, pickle) of the queue starts empty.
    """

    def __init__(self, capacity: int = 8) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self._pending: deque[tuple[_TimingEvent, _TimingEvent, _TimingEvent]] = deque()
        self._previous_end: _TimingEvent | None = None
        self._start: _TimingEvent | None = None

    def __len__(self) -> int:
        """Steps ended and not yet read."""
        return len(self._pending)

    def restart(self, mark: _TimingEvent | None) -> None:
        """The next step's idle time counts from `mark` (recorded now) instead of the last step's end;
        None: the next step is not measured. Steps already ended stay in the queue."""
        self._previous_end = mark
        self._start = None

    def step_started(self, start: _TimingEvent) -> None:
        self._start = start

    def step_ended(self, end: _TimingEvent) -> None:
        if self._start is not None and self._previous_end is not None and len(self._pending) < self.capacity:
            self._pending.append((self._previous_end, self._start, end))
        self._previous_end, self._start = end, None

    def newest_share(self) -> float | None:
        """data_time of the newest completed step, dropping it and every older one; None if none completed."""
        newest = None
        while self._pending and all(event.query() for event in self._pending[0]):
            newest = self._pending.popleft()
        if newest is None:
            return None
        previous_end, start, end = newest
        return _wait_share(previous_end.elapsed_time(start), start.elapsed_time(end))

    def __getstate__(self) -> dict[str, Any]:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["capacity"])
