"""bench_core drives the real processor with fakes: it must keep working as they change."""

from __future__ import annotations

import pytest

from touchpoint import bench_core


@pytest.fixture(scope="module")
def bundles() -> list[tuple[int, bytes]]:
    return bench_core.prepare(3_000, partitions=2, bundle=100)


def test_the_journey_stage_applies_every_event_and_mirrors_live_journeys(
    bundles: list[tuple[int, bytes]],
) -> None:
    accepted = bench_core.run_ingest(bench_core.raw_messages(3_000), partitions=2)["touchpoints"]
    result = bench_core.run(bundles, partitions=2, flush_every=5)
    # Every touchpoint ingest accepted was applied, and flushes wrote state,
    # Redis values and output records (friction signals at least).
    assert result["touchpoints"] == accepted
    assert result["changelog_records"] > 0
    assert result["redis_values"] > 0
    assert result["records"] >= result["counts"]["signals"] > 0


def test_ingest_and_raw_stages_count_every_message() -> None:
    messages = bench_core.raw_messages(2_000)
    assert bench_core.run_raw(messages)["touchpoints"] == 2_000
    ingest = bench_core.run_ingest(messages, partitions=2, batch=500, bundle=100)
    assert ingest["touchpoints"] == 2_000  # the simulator's traffic is all valid
    assert ingest["bytes"] > 0


def test_main_prints_events_per_second(capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_core.main(["--events", "2000", "--repeat", "1", "--flush-every", "5"]) == 0
    assert "events/s" in capsys.readouterr().out
