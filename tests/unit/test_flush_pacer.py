"""FlushPacer: the write-behind flush runs on schedule, and is deferred only while the worker is saturated."""

from __future__ import annotations

import asyncio
import time

from streams.pacing import FlushPacer, time_idle


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _run(pacer: FlushPacer, clock: Clock, seconds: float, idle_s: float = 0.0) -> None:
    """``seconds`` of work, of which the event loop idled ``idle_s``."""
    clock.t += seconds
    pacer.idled(idle_s)


def _pacer(clock: Clock, backlog_interval_s: float = 3.0) -> FlushPacer:
    pacer = FlushPacer(1.0, backlog_interval_s, clock=clock)
    pacer.measured = True  # as after time_idle() on the worker's loop
    return pacer


def test_a_worker_that_keeps_up_flushes_on_every_tick() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    for _ in range(5):
        _run(pacer, clock, 1.0, idle_s=0.5)  # half the time idle: keeping up
        assert pacer.due()
        pacer.flushed()


def test_a_saturated_worker_defers_until_the_backlog_interval() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    _run(pacer, clock, 1.0, idle_s=0.02)
    assert not pacer.due()  # 2 % idle: there was always work waiting
    _run(pacer, clock, 1.0, idle_s=0.02)
    assert not pacer.due()
    _run(pacer, clock, 1.0, idle_s=0.02)
    assert pacer.due()  # 3 s since the last flush: no longer
    pacer.flushed()
    _run(pacer, clock, 1.0, idle_s=0.5)  # idle time from before the flush is forgotten
    pacer.flushed()
    _run(pacer, clock, 1.0)
    assert not pacer.due()


def test_the_flush_follows_soon_after_the_backlog_is_gone() -> None:
    clock = Clock()
    pacer = _pacer(clock)
    _run(pacer, clock, 1.5)
    assert not pacer.due()
    _run(pacer, clock, 0.5, idle_s=0.5)  # the backlog is done: the loop waits for input
    assert abs(pacer.idle_fraction() - 0.25) < 1e-9
    assert pacer.due()


def test_deferral_is_off_when_the_backlog_interval_is_not_longer() -> None:
    clock = Clock()
    pacer = _pacer(clock, backlog_interval_s=1.0)
    _run(pacer, clock, 1.0)
    assert pacer.due()


def test_an_unmeasured_loop_never_defers() -> None:
    clock = Clock()
    pacer = FlushPacer(1.0, 3.0, clock=clock)
    _run(pacer, clock, 1.0)
    assert not pacer.measured
    assert pacer.due()


def test_time_idle_counts_the_selector_waits_of_a_real_event_loop() -> None:
    pacer = FlushPacer(1.0, 3.0)
    loop = asyncio.new_event_loop()
    try:
        assert time_idle(loop, pacer)
        assert pacer.measured

        async def work() -> None:
            await asyncio.sleep(0.2)  # idle: the loop blocks in select
            end = time.perf_counter() + 0.2
            while time.perf_counter() < end:  # busy: no select meanwhile
                pass

        loop.run_until_complete(work())
    finally:
        loop.close()
    assert 0.18 < pacer._idle < 0.3, pacer._idle


def test_time_idle_leaves_a_loop_without_a_selector_unmeasured() -> None:
    pacer = FlushPacer(1.0, 3.0)
    assert not time_idle(object(), pacer)  # type: ignore[arg-type]
    assert not pacer.measured
