"""`StepEventQueue`, the non-blocking reader of a step's device timing events behind
`train/data_time` on an accelerator, driven by stand-in events whose completion the test controls."""

from __future__ import annotations

import copy

import pytest

from lightning_modules.step_timing import StepEventQueue, wait_share


class _ClockEvent:
    """Stand-in for a CUDA timing event (the queue, not CUDA, is under test): a time stamp `t`
    (seconds) that the "device" reaches when the test sets `done`; like CUDA, `elapsed_time`
    (milliseconds) refuses an event that has not completed."""

    def __init__(self, t: float, done: bool = False) -> None:
        self.t, self.done, self.queries = t, done, 0

    def query(self) -> bool:
        self.queries += 1
        return self.done

    def elapsed_time(self, end_event: _ClockEvent) -> float:
        if not (self.done and end_event.done):
            raise RuntimeError("elapsed_time on an event that has not completed")
        return (end_event.t - self.t) * 1000.0


def _queue_steps(queue: StepEventQueue, *spans: tuple[float, float]) -> list[_ClockEvent]:
    """Steps given as (start, end) times, pushed through the queue; returns their events in stream order."""
    events = []
    for start, end in spans:
        events += [_ClockEvent(start), _ClockEvent(end)]
        queue.step_started(events[-2])
        queue.step_ended(events[-1])
    return events


def test_step_event_queue_reads_completed_steps_only_newest_first():
    queue = StepEventQueue()
    queue.restart(_ClockEvent(0.0, done=True))  # the epoch start
    # Idle 1 s then a 1 s step; idle 0 (the host was ahead) then 3 s; idle 2 s then 2 s.
    events = _queue_steps(queue, (1.0, 2.0), (2.0, 5.0), (7.0, 9.0))
    assert len(queue) == 3
    assert queue.newest_share() is None  # the device has finished nothing: nothing to log
    for event in events[:2]:
        event.done = True
    assert queue.newest_share() == pytest.approx(0.5)
    assert len(queue) == 2
    assert queue.newest_share() is None
    for event in events[2:]:  # both later steps complete: the newest one is read, the older dropped
        event.done = True
    assert queue.newest_share() == pytest.approx(0.5)
    assert len(queue) == 0 and queue.newest_share() is None


def test_step_event_queue_host_ahead_gives_zero_and_order_of_completion_is_respected():
    queue = StepEventQueue()
    queue.restart(_ClockEvent(0.0, done=True))
    first, second = _queue_steps(queue, (0.0, 4.0)), _queue_steps(queue, (4.0, 6.0))
    for event in second:  # cannot happen on one stream; the queue still waits for the older step
        event.done = True
    assert queue.newest_share() is None
    first[1].done = True  # first[0] (its start) has not completed
    assert queue.newest_share() is None
    first[0].done = True
    assert queue.newest_share() == pytest.approx(0.0)  # back-to-back steps: the device never waited


def test_step_event_queue_restart_times_the_first_step_from_the_mark_and_none_skips_it():
    queue = StepEventQueue()
    queue.restart(_ClockEvent(10.0, done=True))
    events = _queue_steps(queue, (13.0, 14.0))  # the epoch's first batch took 3 s to arrive
    for event in events:
        event.done = True
    assert queue.newest_share() == pytest.approx(0.75)
    queue.restart(None)
    events = _queue_steps(queue, (20.0, 21.0), (22.0, 23.0))
    assert len(queue) == 1  # the first step after restart(None) has no previous end
    for event in events:
        event.done = True
    assert queue.newest_share() == pytest.approx(0.5)
    fresh = StepEventQueue()
    _queue_steps(fresh, (0.0, 1.0))  # never restarted: no previous end either
    assert len(fresh) == 0


def test_step_event_queue_is_bounded_and_keeps_measuring_when_full():
    queue = StepEventQueue(capacity=2)
    queue.restart(_ClockEvent(0.0, done=True))
    events = _queue_steps(queue, (1.0, 2.0), (2.0, 3.0), (3.0, 4.0), (5.0, 6.0))
    assert len(queue) == 2  # the last two steps were not measured
    for event in events:
        event.done = True
    assert queue.newest_share() == pytest.approx(0.0)  # the second step, not the fourth
    events = _queue_steps(queue, (8.0, 9.0))  # its idle time counts from the unmeasured fourth step's end
    for event in events:
        event.done = True
    assert queue.newest_share() == pytest.approx(2.0 / 3.0)
    with pytest.raises(ValueError, match="capacity"):
        StepEventQueue(capacity=0)


def test_step_event_queue_copies_start_empty():
    queue = StepEventQueue(capacity=3)
    queue.restart(_ClockEvent(0.0))
    _queue_steps(queue, (1.0, 2.0))
    copied = copy.deepcopy(queue)
    assert len(queue) == 1 and len(copied) == 0 and copied.capacity == 3
    _queue_steps(copied, (3.0, 4.0))
    assert len(copied) == 0  # no previous end survived the copy


def test_wait_share_is_in_unit_range():
    assert wait_share(1.0, 3.0) == pytest.approx(0.25)
    assert wait_share(-1.0, 2.0) == 0.0 and wait_share(0.0, 0.0) == 0.0
