"""The collector's producer after its broker lost its state (Tansu restart).

A broker restarted without its producer-id state answers the idempotent
producer's old id with UNKNOWN_PRODUCER_ID, and librdkafka retries that
forever; the same client also stops for good after a fatal idempotence error.
The collector's publisher must replace its client then, as the other producers
do (StallWatch), instead of answering every request with an error until it is
restarted.
"""

from __future__ import annotations

import asyncio
import time

from touchpoint.broker import EmbeddedBroker
from touchpoint.collector import Publisher
from touchpoint.config import KafkaSettings, TopicSettings
from touchpoint.topics import ensure_topics


def test_publisher_gets_a_new_client_when_the_broker_lost_its_producer_ids(
    own_broker: EmbeddedBroker, topics: TopicSettings
) -> None:
    kafka = KafkaSettings(bootstrap_servers=own_broker.bootstrap, session_timeout_ms=6_000)
    ensure_topics(kafka, topics)
    topic = topics.raw("web")
    publisher = Publisher(kafka, timeout_s=5.0, stall_after_s=3.0)
    try:
        assert asyncio.run(publisher.publish([(topic, b"k", b"before")])) is None

        own_broker.stop()
        own_broker.start()
        ensure_topics(kafka, topics)  # memory storage: `touchpoint topics create` again

        outcomes: list[str | None] = []
        deadline = time.monotonic() + 90
        while not outcomes or outcomes[-1] is not None:
            assert time.monotonic() < deadline, f"no delivery after the restart: {outcomes[-3:]}"
            outcomes.append(asyncio.run(publisher.publish([(topic, b"k", b"after")])))
        assert publisher.renewed >= 1
    finally:
        publisher.close(5)
