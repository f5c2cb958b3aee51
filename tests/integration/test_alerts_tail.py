"""`touchpoint alerts tail` against the real broker: alerts printed, other records skipped."""

from __future__ import annotations

import os
import subprocess
import sys

from confluent_kafka import Producer

from touchpoint import jsonio
from touchpoint.config import KafkaSettings, TopicSettings
from touchpoint.topics import ensure_topics


def test_alerts_tail_prints_alerts_and_skips_records_that_are_not_alerts(
    kafka: KafkaSettings, topics: TopicSettings
) -> None:
    ensure_topics(kafka, topics)
    alert = {
        "alert_id": "al-payment_failure-web-20261203T1000",
        "state": "firing",
        "description": "payment failures on web: 42 in 1 min (baseline 3.0)",
        "window": {"start": "2026-12-03T10:00:00.000Z", "end": "2026-12-03T10:01:00.000Z"},
    }
    producer = Producer(kafka.librdkafka())
    for value in (b"not json", None, jsonio.dumps([1, 2]), jsonio.dumps(alert)):
        producer.produce(topics.alerts, value, partition=0)
    assert producer.flush(30) == 0

    env = {
        **os.environ,
        "TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "TOUCHPOINT_TOPICS_PREFIX": topics.prefix,
        "TOUCHPOINT_TOPICS_PARTITIONS": str(topics.partitions),
    }
    done = subprocess.run(
        [sys.executable, "-m", "touchpoint", "alerts", "tail", "--from-beginning", "--no-follow"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "2026-12-03T10:01:00.000Z FIRING   al-payment_failure-web-20261203T1000  "
        "payment failures on web: 42 in 1 min (baseline 3.0)"
    ]
    skipped = [line for line in done.stderr.splitlines() if line.startswith("skipped a record")]
    assert len(skipped) == 3, done.stderr
    assert f"{topics.alerts}[0]@0" in skipped[0]
