"""Read a range of bundles straight from Kafka: the ones the worker's consumer skipped.

See :meth:`streams.journeys.JourneyProcessor.missing` for when that happens.
A plain confluent-kafka consumer with a manual assignment (no group, no
commits): it never joins the worker's consumer group, so reading does not
trigger a rebalance.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from touchpoint.config import KafkaSettings

log = logging.getLogger(__name__)


class BundleReader:
    def __init__(self, kafka: KafkaSettings, topic: str, timeout_s: float = 30.0) -> None:
        self.kafka = kafka
        self.topic = topic
        self.timeout_s = timeout_s
        self._consumer: Any = None

    def _client(self) -> Any:
        if self._consumer is None:
            self._consumer = Consumer(
                {
                    **self.kafka.librdkafka(),
                    # Required by the client, never used: no subscribe, no commit.
                    "group.id": f"touchpoint-refetch-{uuid.uuid4().hex[:8]}",
                    "enable.auto.commit": False,
                    "enable.auto.offset.store": False,
                    "auto.offset.reset": "earliest",
                    # The records asked for exist: do not let the broker hold
                    # the fetch (Tansu held it ~0.5 s per read otherwise).
                    "fetch.wait.max.ms": 10,
                }
            )
        return self._consumer

    def read(self, partition: int, offsets: range) -> list[tuple[int, bytes]]:
        """The records of ``partition`` at ``offsets`` that the topic still holds, in order.

        The partition must hold a record at ``offsets.stop - 1`` or later:
        reading ends there. The worker asks for bundles it knows were written
        (before the one it is handling, or before the committed offset), and
        the bundle topic has no offsets without a record. Offsets deleted by
        retention are left out, as are offsets with no record. Raises
        :class:`TimeoutError` if the broker does not deliver the rest within
        ``timeout_s``.

        The high watermark is not used to end the read: Tansu (the test
        broker) reports a wrong one after batched writes.
        """
        if not offsets:
            return []
        consumer = self._client()
        low, _high = consumer.get_watermark_offsets(
            TopicPartition(self.topic, partition), timeout=self.timeout_s
        )
        start, stop = max(offsets.start, low), offsets.stop
        if start >= stop:
            return []
        consumer.assign([TopicPartition(self.topic, partition, start)])
        records: list[tuple[int, bytes]] = []
        deadline = time.monotonic() + self.timeout_s
        try:
            while True:
                # Asks for no more than is missing: consume() returns as soon as
                # it has that many (or after the timeout).
                for message in consumer.consume(min(stop - start, 500), 0.5):
                    error = message.error()
                    if error is not None:
                        if error.code() != KafkaError._PARTITION_EOF:
                            log.warning("refetch from %s: %s", self.topic, error)
                        continue
                    offset = message.offset()
                    if start <= offset < stop:
                        records.append((offset, message.value()))
                    if offset >= stop - 1:
                        return records
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{self.topic}[{partition}]: offsets {start}..{stop - 1} not "
                        f"delivered in {self.timeout_s:.0f} s ({len(records)} read)"
                    )
        finally:
            consumer.unassign()

    def close(self) -> None:
        if self._consumer is not None:
            with contextlib.suppress(KafkaException):
                self._consumer.close()
            self._consumer = None
