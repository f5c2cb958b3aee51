"""The Kafka benchmark's report: ratios against the raw ceiling of the same run."""

from __future__ import annotations

import re

import pytest

from touchpoint.bench import BenchResult, _report


def _result() -> BenchResult:
    result = BenchResult(200_000, 4, "test broker", 299.4, 250_000.0)
    result.raw_eps = [600_000.0, 500_000.0]
    result.ingest_eps = [240_000.0, 300_000.0, 180_000.0]
    result.journeys_eps = 55_000.0
    result.end_to_end_eps = 48_000.0
    result.worker_stats = {
        "counts": {"changelog_records": 52_000, "closed": 10_000, "duplicates": 0},
        "state_bytes_by_touchpoints": {"20": 1_475},
        "redis_written": 51_000,
        "touchpoints": 201_000,
        "bundles": 1_005,
    }
    return result


def _figure(out: str, label: str) -> str:
    found = re.search(rf"{re.escape(label)}\s+([\d.,]+)", out)
    assert found is not None, f"{label!r} not in:\n{out}"
    return found.group(1)


def test_report_prints_the_ratios_to_the_best_raw_run(capsys: pytest.CaptureFixture[str]) -> None:
    _report(_result())
    out = capsys.readouterr().out
    assert _figure(out, "ingest / raw ceiling") == "0.40"  # median ingest 240k / best raw 600k
    assert _figure(out, "end to end / raw ceiling") == "0.08"
    assert _figure(out, "changelog records per event") == "0.260"
    assert _figure(out, "state bytes per live journey of 20 touchpoints") == "1475"
    assert _figure(out, "touchpoints per bundle the worker read") == "200"


def test_report_without_worker_stats_leaves_the_bundle_line_out(
    capsys: pytest.CaptureFixture[str],
) -> None:
    result = _result()
    result.worker_stats = {}
    _report(result)
    out = capsys.readouterr().out
    assert "end to end / raw ceiling" in out
    assert "touchpoints per bundle" not in out
