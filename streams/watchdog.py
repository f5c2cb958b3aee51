"""Faust changelog recovery that stops making progress: nudge it, then give up.

faust-streaming can hang in recovery (its issues #21 and #74). Seen here
twice in full test runs: a worker that took changelog partitions over after
another one left never received a record of them ("No event received for
active tp ... since recovery start" for 80 s and more) and never became
ready, so its partitions were processed by nobody.

The worker samples, every few seconds, how many records Faust's recovery
still has to read per changelog partition. When none of those figures has
moved for ``stall_s``, the shell seeks the stalled partitions again, to
where recovery had got (as Faust does when recovery starts; records read
twice are skipped by offset), and resumes them in case they were left
paused. It does so up to ``nudges`` times, ``stall_s`` apart; if recovery
still does not move, the worker exits so its supervisor starts it again: a
new group member, a fresh recovery. In the hangs seen on 2026-12-06 the
first re-seek ended recovery within 40 ms.
This module holds the decision only (an injectable clock, no Faust).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import Any, Literal, TypeVar

Action = Literal["nudge", "exit"]
K = TypeVar("K", bound=Hashable)


class RecoveryWatch:
    def __init__(
        self, stall_s: float, nudges: int = 1, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stall_s = stall_s
        self.nudges = nudges
        self.clock = clock
        self._last: frozenset[tuple[Any, int]] | None = None
        self._since = 0.0
        self._nudged = 0

    def check(self, remaining: Mapping[K, int] | None) -> tuple[Action, list[K]] | None:
        """What to do, given the records left per partition (None: not recovering).

        Returns None while recovery progresses (or is not running, or
        ``stall_s`` is 0), else the action and the partitions that are stuck.
        """
        now = self.clock()
        left = {tp: n for tp, n in (remaining or {}).items() if n > 0}
        if not left or self.stall_s <= 0:
            self._last, self._nudged = None, 0
            return None
        state = frozenset(left.items())
        if state != self._last:
            # Progress, or a new recovery: start over.
            self._last, self._since, self._nudged = state, now, 0
            return None
        if now - self._since < self.stall_s:
            return None
        self._since = now
        stuck = sorted(left, key=repr)
        if self._nudged < self.nudges:
            self._nudged += 1
            return "nudge", stuck
        return "exit", stuck
