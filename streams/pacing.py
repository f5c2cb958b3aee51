"""When the worker's write-behind flush runs: on schedule, or less often while saturated.

A flush encodes every state changed since the last one, writes it to the
changelog and Redis, and publishes the outputs. Its cost is per *state*, not
per event: a customer whose events all land between two flushes is encoded
and written once. In live operation the worker keeps up and flushes every
``interval_s``, so Redis and the output topics trail the input by about that
much. While it works through a backlog (after an outage, a deployment, a
backfill), its outputs trail by the backlog anyway, and flushing every
second would spend time re-encoding the same busy customers. Then the flush
is deferred, up to ``backlog_interval_s`` after the last one; Kafka Streams
does the same with its record caches and a 30 s default commit interval.

"Saturated" is measured, not guessed: the worker reports how long its event
loop sat idle waiting for I/O (:func:`time_idle`). If that was less than
``idle_share`` of the time since the last flush, there was always work
waiting: a backlog, or input arriving as fast as the worker can take it. The
moment the backlog is gone the loop idles, and the next tick flushes.

What a deferral costs: a crash replays up to ``backlog_interval_s`` more of
input (bounded anyway by the worker's ``max_unacked_bundles``), and the
bundles not yet acked stay in memory until the flush.

:class:`FlushPacer` holds the decision only (an injectable clock, no Faust).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


class FlushPacer:
    def __init__(
        self,
        interval_s: float,
        backlog_interval_s: float,
        *,
        idle_share: float = 0.1,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.backlog_interval_s = backlog_interval_s
        self.idle_share = idle_share
        self.clock = clock
        self.measured = False  # no idle figures (see time_idle): never defer
        self._since = clock()  # the last flush (or start)
        self._idle = 0.0  # seconds the event loop idled since then

    def idled(self, seconds: float) -> None:
        """The event loop waited ``seconds`` for I/O with nothing else to do."""
        self._idle += seconds

    def flushed(self) -> None:
        """A flush started: what follows belongs to the next one."""
        self._since = self.clock()
        self._idle = 0.0

    def idle_fraction(self) -> float:
        """Share of the time since the last flush that the event loop idled."""
        elapsed = self.clock() - self._since
        return 1.0 if elapsed <= 0 else min(1.0, self._idle / elapsed)

    def due(self) -> bool:
        """Flush now? (asked on every tick of the ``interval_s`` timer)."""
        if not self.measured or self.backlog_interval_s <= self.interval_s:
            return True
        if self.clock() - self._since >= self.backlog_interval_s:
            return True
        return self.idle_fraction() >= self.idle_share


def time_idle(loop: asyncio.AbstractEventLoop, pacer: FlushPacer) -> bool:
    """Report the loop's waits for I/O to ``pacer``; False if this loop cannot be measured.

    asyncio's selector loop blocks in ``selector.select(timeout)`` exactly when
    no callback is ready: that call's duration is the loop's idle time. The
    selector is a private attribute of ``BaseSelectorEventLoop`` (the loop the
    worker runs, as Faust/mode set no other); with any other loop the pacer is
    left unmeasured and flushes on every tick.
    """
    selector: Any = getattr(loop, "_selector", None)
    select = getattr(selector, "select", None)
    if select is None:
        log.info("event loop %s cannot be timed: the flush runs on every tick", type(loop))
        return False
    clock = time.perf_counter
    idled = pacer.idled

    def timed_select(timeout: float | None = None) -> Any:
        started = clock()
        try:
            return select(timeout)
        finally:
            idled(clock() - started)

    selector.select = timed_select
    pacer.measured = True
    return True
