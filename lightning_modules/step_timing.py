"""Timing a training step's wait for its input on an accelerator without blocking the host:
`StepEventQueue` holds each step's device events until the device has reached them, and
`wait_share` turns a wait and a step time into `train/data_time` (used by
`callbacks.DataTimeMonitor`)."""

from __future__ import annotations

from collections import deque
from typing import Any, Protocol

import torch

__all__ = ["StepEventQueue", "TimingEvent", "record_cuda_event", "wait_share"]


def record_cuda_event(device: torch.device) -> torch.cuda.Event:
    """A timing event recorded on `device`'s current stream (the step's stream)."""
    event = torch.cuda.Event(enable_timing=True)
    event.record(torch.cuda.current_stream(device))
    return event


class TimingEvent(Protocol):
    """What `StepEventQueue` needs of an event (torch.cuda.Event with enable_timing=True has it)."""

    def query(self) -> bool: ...

    def elapsed_time(self, end_event: Any) -> float: ...


def wait_share(wait: float, step: float) -> float:
    """`train/data_time` of one step: the wait for its input over wait + step, in [0, 1] (negative clock
    differences count as 0)."""
    wait, step = max(0.0, wait), max(0.0, step)
    return wait / max(wait + step, 1e-12)


class StepEventQueue:
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
        self._pending: deque[tuple[TimingEvent, TimingEvent, TimingEvent]] = deque()
        self._previous_end: TimingEvent | None = None
        self._start: TimingEvent | None = None

    def __len__(self) -> int:
        """Steps ended and not yet read."""
        return len(self._pending)

    def restart(self, mark: TimingEvent | None) -> None:
        """The next step's idle time counts from `mark` (recorded now) instead of the last step's end;
        None: the next step is not measured. Steps already ended stay in the queue."""
        self._previous_end = mark
        self._start = None

    def step_started(self, start: TimingEvent) -> None:
        self._start = start

    def step_ended(self, end: TimingEvent) -> None:
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
        return wait_share(previous_end.elapsed_time(start), start.elapsed_time(end))

    def __getstate__(self) -> dict[str, Any]:
        return {"capacity": self.capacity}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["capacity"])
