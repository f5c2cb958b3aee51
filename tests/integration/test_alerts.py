"""The payment-outage scenario against the real broker: ingest + worker + alerting.

A backfill of simulated history (1 hour of event time, outage at minute 30)
goes through the raw topics; the alerts topic must show the outage's alerts
and exactly the same alert ids again when the file is replayed into fresh topics
by a fresh worker.

Known limit, stated in the README: identity stitching forwards anonymous
events to the customer's partition through Kafka, and in a backfill running
much faster than real time they arrive after that partition's backlog, so
the replay comparison uses traffic without anonymous visitors.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from streams.core.sessionizer import MINUTE
from tests.pipeline import Pipeline, wait_until
from tests.reference import assert_valid_record
from tests.scenarios import (
    GAP_MS,
    GRACE_MS,
    JOURNEY_ENV,
    MINUTES,
    OUTAGE_LENGTH,
    OUTAGE_START,
    T0,
    scenario_rules,
    traffic,
)
from touchpoint.config import KafkaSettings, RedisSettings, TopicSettings

SEED = 4


def minute(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def run_broker(
    kafka: KafkaSettings,
    redis_settings: RedisSettings,
    tmp_path: Path,
    name: str,
    events: list[dict[str, Any]],
    rules: Path,
    outage: bool = True,
) -> list[dict[str, Any]]:
    topics = TopicSettings(prefix=f"t{name}.touchpoints", partitions=4)
    env = {k.removeprefix("TOUCHPOINT_JOURNEY_").lower(): v for k, v in JOURNEY_ENV.items()}
    (tmp_path / name).mkdir()
    p = Pipeline(kafka, topics, redis_settings, name, tmp_path / name, start_ingest=False, **env)
    try:
        p.env["TOUCHPOINT_RULES_FILE"] = str(rules)
        p.env["TOUCHPOINT_REDIS_ENABLED"] = "false"
        worker = p.worker()
        worker.wait_ready(partitions=topics.partitions)
        # The recorded file is in the raw topics before ingest reads it, as in
        # any replay. (Sending an hour of history in seconds while ingest reads
        # would let one raw partition run minutes ahead of another that is
        # momentarily at its end: a disorder live traffic never has.)
        p.send(*events)
        p.start_ingest()
        # Done when the worker has applied everything and the stream time has
        # closed the last windows (the backfill ends at minute 60).
        wait_until(lambda: (s := worker.health()) and s["touchpoints"] >= len(events) - 50, 240)

        if not outage:
            # Done when the alert stage has closed the windows up to the end of
            # the traffic, less its lateness: then every alert it would raise is out.
            last = T0 + MINUTES * MINUTE - 5 * MINUTE

            def closed() -> Any:
                stats = worker.stats()
                return stats if stats["alert_window_closed"] >= last else None

            stats = wait_until(closed, 120)
            assert stats["alert_late_signals"] == 0
            assert stats["counts"]["signals"] > 100  # friction was there, below spike level
            return p.read(topics.alerts, lambda docs: False, timeout=3)

        def settled(docs: list[dict[str, Any]]) -> bool:
            return any(d["rule"] == "cart_abandonment" and d["state"] == "resolved" for d in docs)

        alerts = p.read(topics.alerts, settled, timeout=120)
        assert worker.stats()["alert_late_signals"] == 0  # every signal counted in its window
        return alerts
    finally:
        p.close()


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict[str, Any]], Path]:
    tmp = tmp_path_factory.mktemp("scenario")
    return traffic(SEED, outage=True, anonymous_share=0.0), scenario_rules(tmp)


def test_outage_alerts_fire_and_a_replay_raises_the_same_alert_ids(
    kafka: KafkaSettings,
    redis_settings: RedisSettings,
    unique: str,
    tmp_path: Path,
    scenario: tuple[list[dict[str, Any]], Path],
) -> None:
    events, rules = scenario
    first = run_broker(kafka, redis_settings, tmp_path, f"{unique}a", events, rules)
    for alert in first:
        assert_valid_record(alert)
    start = T0 + OUTAGE_START
    end = start + OUTAGE_LENGTH
    fired = {
        a["rule"]: minute(a["window"]["start"])
        for a in reversed(first)
        if a["channel"] == "all" and a["state"] == "firing"
    }
    assert start <= fired["payment_failure"] <= start + 3 * 60_000
    assert start <= fired["payment_support_contact"] <= end
    assert start <= fired["cart_abandonment"] <= end + GAP_MS + GRACE_MS + 5 * 60_000
    resolved = {a["alert_id"] for a in first if a["state"] == "resolved"}
    assert {a["alert_id"] for a in first if a["state"] == "firing"} == resolved
    replay = run_broker(kafka, redis_settings, tmp_path, f"{unique}b", events, rules)
    assert sorted((a["alert_id"], a["state"]) for a in replay) == sorted(
        (a["alert_id"], a["state"]) for a in first
    )


def test_the_same_duration_of_normal_traffic_raises_no_alert(
    kafka: KafkaSettings,
    redis_settings: RedisSettings,
    unique: str,
    tmp_path: Path,
    scenario: tuple[list[dict[str, Any]], Path],
) -> None:
    _, rules = scenario
    events = traffic(SEED, outage=False, anonymous_share=0.0)
    alerts = run_broker(kafka, redis_settings, tmp_path, f"{unique}n", events, rules, outage=False)
    assert alerts == []
