"""Stream time: time that advances from the events themselves.

Each partition's clock is the latest event time seen on it. When a *live*
partition goes quiet (its events were recent when they arrived, nothing is
left to read, and ``idle_ms`` passed), the clock keeps moving with the wall
clock, so idle journeys still close and windows still end. While events
flow, wait unread, or are history being replayed, the wall clock plays no
part: replaying last year's file gives the same journeys, signals and alerts
it gave live (a backfill's last journeys close when newer events arrive).
The clock never goes backwards.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

_minutes: dict[int, str] = {}


def iso_ms(epoch_ms: int) -> str:
    """RFC 3339 UTC with milliseconds, e.g. ``2026-11-02T09:15:00.120Z``.

    Formatting via datetime costs ~3 us and summaries format every touchpoint
    time, so the part up to the minute is cached (event times cluster).
    """
    minute, rest = divmod(epoch_ms, 60_000)
    head = _minutes.get(minute)
    if head is None:
        if len(_minutes) > 100_000:
            _minutes.clear()
        head = _minutes[minute] = datetime.fromtimestamp(minute * 60, tz=UTC).strftime(
            "%Y-%m-%dT%H:%M:"
        )
    second, ms = divmod(rest, 1000)
    return f"{head}{second:02d}.{ms:03d}Z"


class StreamClock:
    """Event-time clock of one partition, with a wall-clock fallback when idle."""

    __slots__ = (
        "_floor", "_wall", "arrival_lag_ms", "arrived", "behind", "idle_ms", "live_lag_ms",
        "watermark",
    )  # fmt: skip

    def __init__(
        self,
        idle_ms: int = 5_000,
        wall: Callable[[], float] = time.time,
        watermark: int = 0,
        live_lag_ms: int = 600_000,
    ) -> None:
        self.idle_ms = idle_ms
        # The wall clock only stands in for a *live* stream: one whose latest
        # events were at most live_lag_ms old when they arrived. A replay of
        # history that pauses (upstream stall, slow fetch) must not drift.
        self.live_lag_ms = live_lag_ms
        self.arrival_lag_ms = 0
        self._wall = wall
        self.watermark = watermark  # latest event time seen (ms)
        self.arrived = wall()  # wall time of the latest event (any event, late ones too)
        self._floor = watermark
        # True while the partition has unread input: it is behind, not idle, and
        # its time must not follow the wall clock (a stalled replay would drift).
        self.behind = False

    def observe(self, max_event_ms: int) -> None:
        """Events arrived, the newest at ``max_event_ms``."""
        if max_event_ms > self.watermark:
            self.watermark = max_event_ms
        self.arrived = self._wall()
        self.arrival_lag_ms = int(self.arrived * 1000) - self.watermark

    def now(self) -> int:
        """Stream time in epoch ms: the watermark, plus wall time beyond ``idle_ms`` of silence."""
        if self.behind or self.arrival_lag_ms > self.live_lag_ms:
            idle = 0
        else:
            idle = int((self._wall() - self.arrived) * 1000) - self.idle_ms
        current = self.watermark + idle if idle > 0 else self.watermark
        if current > self._floor:
            self._floor = current
        return self._floor
