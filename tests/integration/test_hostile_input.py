"""The hostile-input corpus through a running ingest process and the real (embedded) broker.

Every case of tests/hostile.py is published as raw bytes (with and without
keys, a tombstone included) to the raw topics while ``touchpoint ingest`` runs.
Afterwards the process must still be running and still accept a valid event,
and every refused case must be in the dead-letter topic exactly once, with its
reason, its original bytes (a prefix past the dead-letter limit) and its source
topic/partition/offset. The odd-but-valid cases (and both copies of a
duplicated event id: ingest is at-least-once; the journey stage drops the
second copy, see tests/unit/test_hostile_input.py) reach the validated topic.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from streams.bundles import Touchpoint, decode_bundle
from tests.hostile import Case, all_cases, check_dead_letter, event
from tests.kafka_helpers import Record, read_topic
from touchpoint import jsonio
from touchpoint.config import IngestSettings, KafkaSettings, TopicSettings
from touchpoint.producer import producer_config
from touchpoint.topics import ensure_topics


def start_ingest(kafka: KafkaSettings, topics: TopicSettings, unique: str, log: Path) -> Any:
    env = {
        **os.environ,
        "TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "TOUCHPOINT_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
        "TOUCHPOINT_TOPICS_PREFIX": topics.prefix,
        "TOUCHPOINT_TOPICS_PARTITIONS": str(topics.partitions),
        "TOUCHPOINT_INGEST_GROUP_ID": f"t{unique}-ingest",
        "TOUCHPOINT_INGEST_BATCH_TIMEOUT_S": "0.1",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "touchpoint", "ingest"],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )


def touchpoint_ids(records: list[Record]) -> list[str]:
    return [
        item.event.event_id
        for record in records
        for item in decode_bundle(record.value).items
        if isinstance(item, Touchpoint)
    ]


def test_the_hostile_corpus_is_dead_lettered_and_ingest_keeps_running(
    kafka: KafkaSettings, topics: TopicSettings, unique: str, tmp_path: Path
) -> None:
    ensure_topics(kafka, topics)
    settings = IngestSettings()  # what the ingest process reads: the defaults
    cases = all_cases(settings, int(time.time() * 1000))
    log = tmp_path / "ingest.log"
    ingest = start_ingest(kafka, topics, unique, log)
    try:
        # Publish every case, recording where each landed.
        landed: dict[tuple[str, int, int], tuple[Case, bytes | None]] = {}
        failures: list[KafkaError] = []
        producer = Producer(producer_config(kafka, **{"message.max.bytes": 2_000_000}))
        for i, case in enumerate(cases):
            topic = topics.raw(topics.sources[i % len(topics.sources)])
            key = None if i % 3 == 0 else f"key-{i}".encode() if i % 3 == 1 else b"\xff\x00" * 700

            def delivered(
                err: KafkaError | None, msg: Message, case: Case = case, key: bytes | None = key
            ) -> None:
                if err is not None:
                    failures.append(err)
                else:
                    landed[(msg.topic(), msg.partition(), msg.offset())] = (case, key)

            producer.produce(topic, case.value, key=key, on_delivery=delivered)
        assert producer.flush(60) == 0 and failures == []
        assert len(landed) == len(cases)

        refused = [c for c in cases if c.reason is not None]
        dead = read_topic(
            kafka, topics.deadletter, until=lambda rs: len(rs) >= len(refused), timeout=120
        )
        assert ingest.poll() is None, log.read_text(errors="replace")[-3000:]

        # Ingest survived: a valid event sent after the corpus is still processed.
        canary = f"ev-canary-{uuid.uuid4().hex[:8]}"
        producer.produce(
            topics.raw("web"), event(canary, int(time.time() * 1000)), key=b"cust-hostile"
        )
        assert producer.flush(30) == 0
        accepted = [c for c in cases if c.reason is None]
        validated = read_topic(
            kafka,
            topics.validated,
            until=lambda rs: canary in touchpoint_ids(rs),
            timeout=120,
        )
        assert canary in touchpoint_ids(validated)
        assert ingest.poll() is None

        # Every refused case: one dead letter, its reason, bytes and coordinates.
        assert len(dead) == len(refused)
        seen = set()
        for record in dead:
            doc = jsonio.loads(record.value)
            source = doc["source"]
            coordinates = (source["topic"], source["partition"], source["offset"])
            assert coordinates not in seen
            seen.add(coordinates)
            case, key = landed[coordinates]
            assert record.key == key
            check_dead_letter(
                doc,
                case,
                topic=source["topic"],
                partition=source["partition"],
                offset=source["offset"],
                key=key,
                payload_limit=settings.deadletter_payload_max_bytes,
            )
        assert sorted(case.name for case, _key in (landed[c] for c in seen)) == sorted(
            c.name for c in refused
        )
        # The odd-but-valid cases were accepted; both copies of the duplicate id too.
        ids = touchpoint_ids(validated)
        expected = [jsonio.loads(c.value)["event_id"] for c in accepted if c.value]
        assert sorted(i for i in ids if i != canary) == sorted(expected)
        assert ids.count("ev-duplicate") == 2
    finally:
        ingest.terminate()
        ingest.wait(30)
    text = log.read_text(errors="replace")
    assert "Traceback" not in text and "unexpected error" not in text, text[-3000:]
