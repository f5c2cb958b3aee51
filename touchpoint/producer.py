"""The Python producer API: validate, then publish to the right raw topic.

confluent-kafka with idempotence (no duplicates from producer retries) and the
``murmur2_random`` partitioner, which is Kafka's Java default and aiokafka's
(Faust's): a customer's events land on the partition Faust expects for that
key. Keys are the customer id, else the anonymous id.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from confluent_kafka import KafkaError, Message, Producer
from msgspec import UNSET

from schemas.decoder import EventDecoder, Rejection
from touchpoint import jsonio
from touchpoint.config import KafkaSettings, TopicSettings
from touchpoint.errors import ConfigError

log = logging.getLogger(__name__)

# Channel -> source system (raw topic suffix). Ads and social touchpoints are
# collected by the website's tracking.
SOURCE_OF_CHANNEL = {
    "web": "web",
    "app": "app",
    "email": "email",
    "store": "store",
    "support": "support",
    "social": "web",
    "ads": "web",
}


def producer_config(kafka: KafkaSettings, **overrides: Any) -> dict[str, Any]:
    """librdkafka settings for producers of customer-keyed topics."""
    return {
        **kafka.librdkafka(),
        "enable.idempotence": True,
        "partitioner": "murmur2_random",
        "linger.ms": 5,
        "queue.buffering.max.messages": 1_000_000,
        **overrides,
    }


class TouchpointProducer:
    """Publishes touchpoint events to raw topics after validating them.

    ``send`` returns None when the event was queued, or the :class:`Rejection`
    when it is invalid (nothing is sent then). Call :meth:`flush` before exit.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        *,
        decoder: EventDecoder | None = None,
        **config: Any,
    ) -> None:
        self.topics = topics
        self.decoder = decoder or EventDecoder()
        self._producer = Producer(producer_config(kafka, **config))
        self.delivered = 0
        self.failed = 0
        self.rejected: Counter[str] = Counter()

    def _on_delivery(self, err: KafkaError | None, _msg: Message) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1
            log.error("delivery failed: %s", err)

    def topic_for(self, source: str) -> str:
        if source not in self.topics.sources:
            raise ConfigError(
                "topics", [f"unknown source {source!r}; configured: {self.topics.sources}"]
            )
        return self.topics.raw(source)

    def send(self, event: dict[str, Any] | bytes, source: str | None = None) -> Rejection | None:
        """Validate and queue one event (a dict, or its JSON bytes)."""
        data = event if isinstance(event, bytes) else jsonio.dumps(event)
        result = self.decoder.validate(data)
        if isinstance(result, Rejection):
            self.rejected[result.reason] += 1
            return result
        decoded, _ts = result
        key = decoded.customer_id if decoded.customer_id is not UNSET else decoded.anonymous_id
        topic = self.topic_for(source or SOURCE_OF_CHANNEL.get(decoded.channel, "web"))
        self.send_raw(topic, data, key.encode())
        return None

    def send_raw(self, topic: str, value: bytes, key: bytes | None = None) -> None:
        """Queue bytes as they are, without validation (tests, replays of raw topics)."""
        while True:
            try:
                self._producer.produce(topic, value, key=key, on_delivery=self._on_delivery)
                break
            except BufferError:
                self._producer.poll(0.05)
        self._producer.poll(0)

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for delivery; returns the number of messages still undelivered."""
        return int(self._producer.flush(timeout))

    def close(self, timeout: float = 30.0) -> int:
        """Flush and release the client; returns the number of undelivered messages."""
        remaining = self.flush(timeout)
        del self._producer
        return remaining

    def __enter__(self) -> TouchpointProducer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
