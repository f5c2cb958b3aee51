"""Reading topics back in tests (plain confluent-kafka, assigned from the beginning)."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

from touchpoint.config import KafkaSettings


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes


def read_topic(
    kafka: KafkaSettings,
    topic: str,
    *,
    until: Callable[[list[Record]], bool],
    timeout: float = 30.0,
) -> list[Record]:
    """Read ``topic`` from the start until ``until(records)`` holds or ``timeout`` passes."""
    consumer = Consumer(
        {**kafka.librdkafka(), "group.id": "test-reader", "enable.auto.commit": False}
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        records: list[Record] = []
        deadline = time.monotonic() + timeout
        while not until(records) and time.monotonic() < deadline:
            for message in consumer.consume(1000, 0.2):
                if message.error() is None:
                    records.append(
                        Record(
                            message.topic(),
                            message.partition(),
                            message.offset(),
                            message.key(),
                            message.value(),
                        )
                    )
        return records
    finally:
        consumer.close()


def at_least(n: int) -> Callable[[list[Record]], bool]:
    return lambda records: len(records) >= n
