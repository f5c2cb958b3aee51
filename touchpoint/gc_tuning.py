"""Cyclic garbage collector settings of the stream processes (worker, ingest)."""

from __future__ import annotations

import gc


def tune() -> None:
    """Collect the young generation less often in the stream processes.

    Journeys keep many small containers alive; with the default threshold
    (700) CPython's cyclic collector ran so often that it cost ~7 us per event
    (measured). The code creates few reference cycles, so collecting every
    200k allocations keeps memory flat while removing most of that cost.
    ``bench_core`` applies the same settings, so it measures what the worker runs.

    200k rather than 50k (2026-12-05, ``bench_core`` on 200k events, 4 runs
    each): 2 young collections taking 50-77 ms in all instead of 10 taking
    139-185 ms, ~0.45 us per event less; each collection pauses ~30 ms
    instead of ~15. At 500k one collection paused ~125 ms for no further gain.
    """
    gc.collect()
    gc.freeze()  # start-up objects never need scanning again
    gc.set_threshold(200_000, 20, 100)
