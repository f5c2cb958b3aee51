"""Fixtures shared by the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from touchpoint.broker import EmbeddedBroker
from touchpoint.config import KafkaSettings


def use_up_producer_ids(kafka: KafkaSettings, n: int = 200) -> None:
    """Make the clients of this test hold producer ids a restarted broker won't give out again.

    Tansu with memory storage numbers producer ids from 1 again after a
    restart, while idempotent clients that outlived it keep theirs. A new
    client that gets an id an old one still writes with collides with it
    (fenced, sequence errors, or writes dropped as duplicates). Real Kafka
    never reuses producer ids; taking the first ``n`` before any client of
    the pipeline starts gives the same property for this test.
    """
    scratch = "producer-ids"
    admin = AdminClient(kafka.librdkafka())
    for future in admin.create_topics([NewTopic(scratch, 1, 1)]).values():
        future.result()
    producers = [Producer({**kafka.librdkafka(), "enable.idempotence": True}) for _ in range(n)]
    for producer in producers:
        producer.produce(scratch, b"")
    for producer in producers:
        assert producer.flush(30) == 0


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[EmbeddedBroker]:
    """A broker for this test alone: it is stopped and restarted."""
    broker = EmbeddedBroker(log_path=tmp_path / "tansu.log").start()
    use_up_producer_ids(KafkaSettings(bootstrap_servers=broker.bootstrap))
    yield broker
    broker.stop()
