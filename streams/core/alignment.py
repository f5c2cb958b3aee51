"""Event-time alignment of input partitions (pure: the ingest shell holds and releases).

A backfill or replay puts history into several raw topics at once. Read
naively, one partition's whole history can arrive before another's first hour
(librdkafka prefetches and hands out long runs of one partition), and
everything from the slower one then looks late downstream. Like Kafka
Streams' timestamp-ordered record selection, ingest holds back events that run
more than ``skew_ms`` ahead of the slowest partition that still has data, and
releases them as that partition catches up. Offsets of held events are not
committed.

Partitions at their end (nothing more to read) never hold the others back,
and neither does a partition that has delivered nothing for ``max_wait_s`` (a
stuck or silent producer must not stall the pipeline, as with Kafka Streams'
``max.task.idle.ms``). A partition known to have unread data (its next offset
is below the high watermark) is waited for longer, up to
``max_backlog_wait_s``: on an overloaded consumer a partition can go seconds
without a fetch while it still holds the oldest events, and releasing the
others past it would make its events late downstream. In live operation
every partition is at its end almost all the time, so everything is released
at once.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable
from operator import itemgetter
from typing import Any

# A held event: (event time ms, source offset, target partition, bundle item).
Held = tuple[int, int, int, Any]
_event_time = itemgetter(0)


class Aligner:
    def __init__(
        self,
        skew_ms: int,
        max_wait_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_backlog_wait_s: float | None = None,
    ) -> None:
        self.skew_ms = skew_ms
        self.max_wait_s = max_wait_s
        self.max_backlog_wait_s = max(
            max_wait_s, max_backlog_wait_s if max_backlog_wait_s is not None else max_wait_s
        )
        self.clock = clock
        self.progress: dict[Hashable, int] = {}  # newest event time read per partition
        self.at_end: set[Hashable] = set()
        self.backlog: set[Hashable] = set()  # known to have unread data
        self.last_data: dict[Hashable, float] = {}
        self.held: dict[Hashable, deque[Held]] = {}

    def assigned(self, partitions: Iterable[Hashable]) -> None:
        """Partitions (re)assigned: they start unknown and waiting."""
        now = self.clock()
        for tp in partitions:
            self.progress.pop(tp, None)
            self.at_end.discard(tp)
            self.backlog.discard(tp)
            self.held.pop(tp, None)
            self.last_data[tp] = now

    def revoked(self, partitions: Iterable[Hashable]) -> None:
        """Partitions gone: their held events are dropped (uncommitted, the next owner reads them)."""
        for tp in partitions:
            self.progress.pop(tp, None)
            self.at_end.discard(tp)
            self.backlog.discard(tp)
            self.held.pop(tp, None)
            self.last_data.pop(tp, None)

    def read(self, tp: Hashable, newest_ms: int, events: list[Held]) -> None:
        """Events were read from ``tp`` (``newest_ms``: -1 if none was valid)."""
        if newest_ms > self.progress.get(tp, -1):
            self.progress[tp] = newest_ms
        self.at_end.discard(tp)
        self.last_data[tp] = self.clock()
        if events:
            queue = self.held.get(tp)
            if queue is None:
                queue = self.held[tp] = deque()
            queue.extend(events)

    def reached_end(self, tp: Hashable) -> None:
        self.at_end.add(tp)
        self.backlog.discard(tp)

    def has_backlog(self, tp: Hashable) -> None:
        """``tp`` is known to have unread data (until it reaches its end)."""
        self.backlog.add(tp)
        self.at_end.discard(tp)

    def limit(self) -> int | None:
        """Events up to this event time may go out now (None: everything may)."""
        if not self.skew_ms:
            return None
        now = self.clock()
        floor = None
        for tp, seen in self.last_data.items():
            if tp in self.at_end:
                continue
            idle = now - seen
            if idle > self.max_wait_s and (
                tp not in self.backlog or idle > self.max_backlog_wait_s
            ):
                continue
            progress = self.progress.get(tp, -1)
            if floor is None or progress < floor:
                floor = progress
        if floor is None:
            return None
        if floor < 0:
            return -1  # a partition has not delivered anything yet: wait for it
        return floor + self.skew_ms

    def release(self) -> list[Held]:
        """Take the held events that may go out, merged into event-time order.

        One release can span minutes of event time across partitions; sorted,
        the slower partition's early events do not trail the faster one's
        late ones (the sort is stable, and each partition's run is already
        ordered, which timsort exploits).
        """
        limit = self.limit()
        out: list[Held] = []
        runs = 0
        progress = self.progress
        for tp, queue in self.held.items():
            if not queue:
                continue
            # Every held event of ``tp`` is at most its progress (the newest
            # read), so a partition whose progress is within the limit goes out
            # whole, without a comparison per event.
            if limit is None or progress.get(tp, -1) <= limit:
                out.extend(queue)
                queue.clear()
                runs += 1
                continue
            before = len(out)
            while queue and queue[0][0] <= limit:
                out.append(queue.popleft())
            runs += len(out) > before
        if runs > 1:
            out.sort(key=_event_time)
        return out

    def first_held_offset(self, tp: Hashable) -> int | None:
        queue = self.held.get(tp)
        return queue[0][1] if queue else None

    def held_count(self, tp: Hashable) -> int:
        queue = self.held.get(tp)
        return len(queue) if queue else 0
