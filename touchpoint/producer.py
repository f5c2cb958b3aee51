"""The Python producer API: validate, then publish to the right raw topic.

confluent-kafka with idempotence (no duplicates from producer retries) and the
``murmur2_random`` partitioner, which is Kafka's Java default and aiokafka's
(Faust's): a customer's events land on the partition Faust expects for that
key. Keys are the customer id, else the anonymous id.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer
from msgspec import UNSET

from schemas.decoder import EventDecoder, Rejection
from touchpoint import jsonio
from touchpoint.config import KafkaSettings, TopicSettings
from touchpoint.errors import ConfigError

log = logging.getLogger(__name__)

_PURGED = (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT)

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


def broker_health(kafka: KafkaSettings, client: str) -> dict[str, Any]:
    """librdkafka settings that keep ``touchpoint_kafka_up{client=...}`` current.

    librdkafka reports its broker connections in its statistics every
    ``statistics_interval_ms`` (served by poll/consume/flush, which every
    Touchpoint client calls all the time). The gauge is 1 while at least one
    broker connection is ``UP`` and 0 while none is: a broker that is down,
    unreachable or refusing the credentials. The series appears with the
    first report, so a process that never reached Kafka has none (alert on
    ``absent`` or on ``up`` for that).
    """
    from touchpoint import metrics

    def on_stats(raw: str) -> None:
        try:
            brokers = jsonio.loads(raw).get("brokers") or {}
            up = any(b.get("state") == "UP" for b in brokers.values())
        except (ValueError, AttributeError):
            return  # not the statistics JSON we know: leave the gauge alone
        metrics.KAFKA_UP.labels(client).set(1 if up else 0)

    return {"statistics.interval.ms": kafka.statistics_interval_ms, "stats_cb": on_stats}


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


def retire(producer: Producer, name: str, timeout: float = 10.0) -> None:
    """Drop what a replaced client holds: its queued and in-flight messages.

    The purge reports are served here (``flush``), so each dropped message's
    delivery callback runs with ``_PURGE_QUEUE``/``_PURGE_INFLIGHT``: the
    owner re-queues, re-reads or fails them as its contract says.
    """
    try:
        producer.purge(in_queue=True, in_flight=True, blocking=False)
        producer.flush(timeout)
    except KafkaException as exc:
        log.warning("old %s client: %s", name, exc)


class StallWatch:
    """Notices a producer that delivers nothing for ``after_s`` while the broker answers.

    A broker that lost its producer-id state (Tansu with memory storage after a
    restart, or a cluster rebuilt from scratch) answers every write of an
    idempotent producer's old id with UNKNOWN_PRODUCER_ID, and librdkafka
    retries that forever instead of asking for a new id. Only a new client
    gets one. Durable Kafka keeps producer state across restarts, so there it
    fires only if the cluster answers metadata requests but takes no writes
    for ``after_s``; a new client does no harm then. While the broker does
    not answer at all, nothing is stalled: librdkafka buffers and reconnects.
    """

    def __init__(self, after_s: float = 15.0) -> None:
        self.after_s = after_s
        self.last_progress = time.monotonic()

    def progress(self) -> None:
        """Something was delivered (call from delivery reports)."""
        self.last_progress = time.monotonic()

    def stalled(self, producer: Producer) -> bool:
        now = time.monotonic()
        if len(producer) == 0:
            self.last_progress = now
            return False
        if now - self.last_progress < self.after_s:
            return False
        # Delivery reports are only seen when the owner polls. After a long
        # spell without polling (a rebalance callback waiting on the broker, a
        # slow commit) the messages may well be delivered with their reports
        # still queued: serve them before judging.
        producer.poll(0)
        if len(producer) == 0 or time.monotonic() - self.last_progress < self.after_s:
            self.last_progress = time.monotonic()
            return False
        self.last_progress = now  # check again after another after_s at the earliest
        try:
            producer.list_topics(timeout=5)
        except KafkaException:
            return False  # the broker is away: keep buffering
        return True


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
        self._config = {"error_cb": self._on_error, **producer_config(kafka, **config)}
        self._producer = Producer(self._config)
        self.delivered = 0
        self.failed = 0
        self.renewed = 0  # times the client was replaced (see StallWatch)
        self.rejected: Counter[str] = Counter()
        self._watch = StallWatch()
        self._renewing = False
        self._fatal = False
        # Messages to send again with the next client (purged by renew, or
        # failed by a fatal error of the idempotent producer).
        self._requeue: list[tuple[str, bytes, bytes | None]] = []
        self._sends = 0

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            # e.g. a sequence desynchronisation after a broker lost its state:
            # this client is done; the next send or flush replaces it.
            self._fatal = True
            log.error("producer fatal error, replacing the client: %s", err)
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("producer: %s", err)  # once per outage; librdkafka logs the rest

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is None:
            self.delivered += 1
            self._watch.progress()
        elif (self._renewing and err.code() in _PURGED) or err.code() == KafkaError._FATAL:
            self._requeue.append((msg.topic(), msg.value(), msg.key()))  # type: ignore[arg-type]
        else:
            self.failed += 1
            log.error("delivery failed: %s", err)

    def _check_stall(self) -> None:
        if self._fatal or self._watch.stalled(self._producer):
            self.renew()

    def renew(self) -> int:
        """Replace the client, re-queueing what it had not delivered; returns that number.

        Messages that were in flight may have been written already: they can
        arrive twice (at-least-once; journeys count an event once by id).
        """
        self._renewing = True
        try:
            retire(self._producer, "producer")  # the purge reports fill ``_requeue``
        finally:
            self._renewing = False
        requeue, self._requeue = self._requeue, []
        why = (
            "after a fatal error"
            if self._fatal
            else f"after {self._watch.after_s:.0f} s without delivery while the broker answers "
            "(it may have lost this producer's id in a restart)"
        )
        self._fatal = False
        self._producer = Producer(self._config)
        self._watch.progress()
        self.renewed += 1
        log.warning("new producer client %s: %d message(s) re-queued", why, len(requeue))
        for topic, value, key in requeue:
            self._produce(topic, value, key)
        return len(requeue)

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
        self._produce(topic, value, key)
        self._producer.poll(0)
        self._sends += 1
        if not self._sends & 1023:
            self._check_stall()

    def _produce(self, topic: str, value: bytes, key: bytes | None) -> None:
        while True:
            try:
                self._producer.produce(topic, value, key=key, on_delivery=self._on_delivery)
                return
            except BufferError:  # queue full (broker slow or away): wait for room
                self._producer.poll(0.05)
                self._check_stall()
            except KafkaException:  # fatal: this client takes nothing more
                self._fatal = True
                self.renew()

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for delivery; returns the number of messages still undelivered."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = int(self._producer.flush(min(1.0, max(0.0, deadline - time.monotonic()))))
            if not remaining or time.monotonic() >= deadline:
                return remaining
            self._check_stall()

    def close(self, timeout: float = 30.0) -> int:
        """Flush and release the client; returns the number of undelivered messages."""
        remaining = self.flush(timeout)
        del self._producer
        return remaining

    def __enter__(self) -> TouchpointProducer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
