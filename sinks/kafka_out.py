"""Output to Kafka from the worker: results, forwarded bundles and the state changelog.

confluent-kafka rather than Faust's producer: Faust spends ~80-100 us per send
(FIELD-NOTES) and the worker writes thousands of changelog records a second.
Everything is idempotent and at-least-once; the worker acks its input offsets
only after :meth:`OutputProducer.flush` confirmed delivery, so output is never
lost, and a replay after a crash re-sends records with the same ids.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from streams.bundles import encode_bundle
from touchpoint.config import KafkaSettings, TopicSettings
from touchpoint.errors import TouchpointError
from touchpoint.producer import broker_health, producer_config

log = logging.getLogger(__name__)


class DeliveryError(TouchpointError):
    """Output could not be delivered within librdkafka's delivery timeout."""


class OutputProducer:
    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        changelog_topic: str,
        *,
        single_record_batches: bool = False,
    ) -> None:
        self.topics = topics
        self.changelog_topic = changelog_topic
        # Delivery reports only for failures: a Python callback per delivered
        # record (thousands of changelog records a second) cost ~2 us each.
        quiet = {"delivery.report.only.error": True}
        quiet["on_delivery"] = self._on_delivery  # type: ignore[assignment]
        self._producer = Producer(
            producer_config(
                kafka, **quiet, **{"linger.ms": 20}, **broker_health(kafka, "worker_output")
            )
        )
        if single_record_batches:
            # Tansu workaround (tests/demo only): see WorkerSettings.
            self._changelog = Producer(
                producer_config(kafka, **quiet, **{"linger.ms": 0, "batch.num.messages": 1})
            )
        else:
            self._changelog = self._producer
        self._failures = 0
        self.changelog_records = 0

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            self._failures += 1
            log.error("output delivery failed: %s", err)

    def _send(self, producer: Producer, topic: str, value: bytes | None, **kwargs: Any) -> None:
        while True:
            try:
                producer.produce(topic, value, **kwargs)
                return
            except BufferError:
                producer.poll(0.05)

    def record(self, topic: str, key: str, value: bytes) -> None:
        """A result record keyed by customer (murmur2, so it follows the customer's partition)."""
        self._send(self._producer, topic, value, key=key.encode())

    def changelog(self, partition: int, key: bytes, value: bytes | None) -> None:
        """A state change (None: tombstone) on the key's own changelog partition."""
        self._send(self._changelog, self.changelog_topic, value, key=key, partition=partition)
        self.changelog_records += 1

    def bundle(self, partition: int, items: list[Any], now_ms: int) -> None:
        """Items for another key's worker, on the validated stream."""
        self._send(
            self._producer, self.topics.validated, encode_bundle(items, now_ms), partition=partition
        )

    def poll(self) -> None:
        self._producer.poll(0)
        if self._changelog is not self._producer:
            self._changelog.poll(0)

    def flush(self, timeout: float = 60.0) -> None:
        """Block until everything sent so far is delivered; raise :class:`DeliveryError` if not."""
        before = self._failures
        unsent = self._producer.flush(timeout)
        if self._changelog is not self._producer:
            unsent += self._changelog.flush(timeout)
        if unsent or self._failures != before:
            raise DeliveryError(f"{unsent} records undelivered, {self._failures - before} failed")
