"""Crash and rebalance mid-stream against the real broker: every event exactly once (SPEC §10).

Simulated traffic (identity stitching, a payment outage, events 2 h late, junk)
goes through the raw topics, ingest and worker processes; see
tests/reliability.py for the scenarios and the accounting. Each produced event
must be found exactly once: in a closed journey (summaries deduplicated by
journey id), a journey still open (worker lookup), the late topic or the
dead-letter topic. Output records published more than once must be identical
(same id, same content). Journeys, late events and friction signals of every
customer that identity stitching does not involve must equal those of an
undisturbed run of the same input (alerts too, when both read a backlog).

The CI run uses TOUCHPOINT_RELIABILITY_EVENTS (default 50,000) events; the
full-size scenarios print their figures with
``python -m tests.reliability crash --events 200000`` (and ``rebalance``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.reliability import (
    Accounting,
    Run,
    Traffic,
    build_traffic,
    compare,
    run_crash,
    run_rebalance,
)
from touchpoint.broker import EmbeddedBroker
from touchpoint.config import KafkaSettings

EVENTS = int(os.environ.get("TOUCHPOINT_RELIABILITY_EVENTS", "50000"))


@pytest.fixture(scope="module")
def traffic() -> Traffic:
    return build_traffic(EVENTS)


@pytest.fixture(scope="module")
def reference(
    broker: EmbeddedBroker, traffic: Traffic, tmp_path_factory: pytest.TempPathFactory
) -> Accounting:
    """The same input through one worker that nothing disturbs."""
    kafka = KafkaSettings(bootstrap_servers=broker.bootstrap, session_timeout_ms=6_000)
    run = run_crash(kafka, tmp_path_factory.mktemp("reference"), traffic, crash_at=())
    assert run.accounting.problems == [], report(run)
    return run.accounting


def report(run: Run) -> str:
    return "\n".join([run.accounting.figures(), *run.accounting.problems, *run.log])


def check(run: Run, traffic: Traffic) -> None:
    acc = run.accounting
    assert acc.problems == [], report(run)
    # The accounting covered every kind of outcome, and stream time closed
    # every journey but the closing events' own.
    assert acc.journeys > EVENTS // 20 and acc.open_journeys == len(traffic.closers)
    assert acc.late >= len(traffic.late) > 0 and acc.dead == len(traffic.junk) > 0
    assert acc.signals > 0


def test_kill_9_mid_stream_and_restart_accounts_for_every_event_once(
    kafka: KafkaSettings, tmp_path: Path, traffic: Traffic, reference: Accounting
) -> None:
    run = run_crash(kafka, tmp_path, traffic, crash_at=(0.25,))
    check(run, traffic)
    # The kill was mid-stream: the restarted worker had a good part of it to do.
    assert run.last_worker_touchpoints > EVENTS // 10, report(run)
    differences = compare(traffic, run.accounting, reference)
    assert not differences, "\n".join([*differences, report(run)])


def test_workers_joining_leaving_and_killed_mid_stream_account_for_every_event_once(
    kafka: KafkaSettings, tmp_path: Path, traffic: Traffic, reference: Accounting
) -> None:
    run = run_rebalance(kafka, tmp_path, traffic)
    check(run, traffic)
    # Not alerts: live-paced input hands stitching items over sooner than a
    # backlog does, and alerts count stitched customers' signals too.
    differences = compare(traffic, run.accounting, reference, alerts=False)
    assert not differences, "\n".join([*differences, report(run)])
