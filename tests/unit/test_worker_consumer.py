"""The worker's bundle consumer asks the broker for short fetch waits (see _ShortFetchWaitThread)."""

from __future__ import annotations

import asyncio
import gc
from pathlib import Path

import pytest

from streams.app import create_app
from touchpoint.config import Settings


@pytest.mark.parametrize(("setting", "expected"), [(None, 100), ("250", 250)])
def test_the_worker_consumer_uses_the_configured_fetch_wait_not_fausts_1500_ms(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, setting: str | None, expected: int
) -> None:
    monkeypatch.setenv("TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:1")  # never contacted
    monkeypatch.setenv("TOUCHPOINT_WORKER_STORE", "memory://")
    monkeypatch.setenv("TOUCHPOINT_WORKER_DATA_DIR", str(tmp_path))
    if setting is not None:
        monkeypatch.setenv("TOUCHPOINT_WORKER_FETCH_MAX_WAIT_MS", setting)

    async def build() -> int:
        app, stage = create_app(Settings())
        thread = app.consumer._thread  # type: ignore[attr-defined]
        consumer = thread._create_worker_consumer(app.transport)
        try:
            # Read by aiokafka when the consumer starts, to build its fetcher.
            return int(consumer._fetch_max_wait_ms)
        finally:
            await consumer.stop()
            # The stage's output producer would retry its bootstrap server
            # (and log it) for the rest of the test session.
            del stage.output._producer, stage.output._changelog
            gc.collect()

    assert asyncio.run(build()) == expected
