"""Cyclic garbage collector settings of the stream processes (worker, ingest)."""

from __future__ import annotations

import gc


def tune() -> None:
    """Collect the young generation less often in the stream processes.

    Journeys keep many small containers alive; with the default threshold
    (700) CPython's cyclic collector ran so often that it cost ~7 us per event
    (measured). The code creates few reference cycles, so collecting every
    50k allocations keeps memory flat while removing most of that cost.
    ``bench_core`` applies the same settings, so it measures what the worker runs.
    """
    gc.collect()
    gc.freeze()  # start-up objects never need scanning again
    gc.set_threshold(50_000, 20, 100)
