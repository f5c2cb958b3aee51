"""Ingest against the real (embedded) broker: valid events to bundles, every bad input to dead letters."""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import pytest

from sinks.deadletter import original_payload
from streams.bundles import Link, Partitioner, Touchpoint, decode_bundle, properties_of
from streams.ingest import IngestWorker
from tests.events import BASE_MS, event, page_view
from tests.kafka_helpers import Record, at_least, read_topic
from tests.reference import assert_valid_record
from touchpoint import jsonio
from touchpoint.config import IngestSettings, KafkaSettings, TopicSettings
from touchpoint.producer import TouchpointProducer

FUTURE_MS = int(time.time() * 1000) + 10 * 24 * 3600 * 1000


def valid_events() -> list[dict[str, Any]]:
    events = [page_view(f"pv-{i}", customer_id=f"cust-{i % 7}") for i in range(40)]
    events += [
        page_view("anon-1", customer_id=None, anonymous_id="anon-abc"),
        event("identify", "id-1", customer_id="cust-3", anonymous_id="anon-abc", method="login"),
        event("cart_add", "ca-1", customer_id="cust-3", cart_id="c1", product_id="p1", price=9.5),
        event("payment_failed", "pf-1", customer_id="cust-3", reason="gateway_error"),
        event("support_contact", "sc-1", channel="support", medium="call", topic="payment"),
        event("survey_response", "sr-1", channel="email", survey="nps", score=3),
        event("email_open", "eo-1", channel="email", campaign_id="cmp", ts="2026-11-02T09:15:00.120+01:00"),
        event("pos_purchase", "pp-1", channel="store", store_id="s1", order_id="o1", value=12.0, currency="EUR"),
    ]  # fmt: skip
    return events


GOOD = page_view("x")


def bad(**changes: Any) -> bytes:
    doc = {**GOOD, **changes}
    return json.dumps({k: v for k, v in doc.items() if v is not ...}).encode()


# (payload, expected reason): the malformed-input cases of SPEC §10 and more.
BAD_INPUTS: list[tuple[bytes, str]] = [
    (b"", "empty_payload"),
    (b"{not json", "malformed_json"),
    (b'{"event_id": "a"', "malformed_json"),
    (json.dumps(GOOD).encode() + b"}", "malformed_json"),
    (b"\xc3\x28\xa0\xa1 latin-1 \xe9", "invalid_encoding"),
    (json.dumps(GOOD).encode().replace(b'"x"', b'"\xff\xfe"'), "invalid_encoding"),
    (b'{"schema": "\\udc00"}', "invalid_encoding"),
    (b"[1, 2, 3]", "not_an_object"),
    (b"42", "not_an_object"),
    (bad(schema=...), "missing_schema"),
    (bad(schema="iglu:com.touchpoint/page_view/jsonschema/7-0-0"), "unknown_schema"),
    (bad(schema="iglu:com.other/thing/jsonschema/1-0-0"), "unknown_schema"),
    (bad(event_id=...), "missing_field"),
    (bad(occurred_at=...), "missing_field"),
    (bad(properties={}), "missing_field"),
    (bad(customer_id=...), "missing_identity"),
    (bad(customer_id=None), "wrong_type"),
    (bad(event_id=123), "wrong_type"),
    (bad(properties={"url": 5}), "wrong_type"),
    (bad(occurred_at=True), "wrong_type"),
    (bad(extra="x"), "unknown_field"),
    (bad(properties={"url": "/", "evil": {"$ne": 1}}), "unknown_field"),
    (bad(channel="carrier-pigeon"), "invalid_value"),
    (bad(event_type="purchase"), "invalid_value"),
    (bad(event_id="x" * 500), "invalid_value"),
    (bad(occurred_at="2026-11-02T09:15:00"), "invalid_value"),
    (bad(occurred_at="2026-02-30T10:00:00Z"), "invalid_value"),
    (bad(occurred_at="next tuesday"), "invalid_value"),
    (bad(occurred_at=-5), "invalid_value"),
    (bad(occurred_at="1970-01-01T00:00:00Z"), "timestamp_out_of_range"),
    (bad(occurred_at=0), "timestamp_out_of_range"),
    (bad(occurred_at=FUTURE_MS), "timestamp_out_of_range"),
    (bad(occurred_at="9999-12-31T23:59:59Z"), "timestamp_out_of_range"),
    (b'{"a":' * 5000 + b"1" + b"}" * 5000, "payload_too_large"),
    (b'{"schema":' + b"[" * 3000 + b"]" * 3000 + b"}", "too_deeply_nested"),
    (b'{"a":' * 1500 + b"1" + b"}" * 1500, "too_deeply_nested"),
    (bad(properties={"url": "/" + "a" * 200_000}), "payload_too_large"),
]


def run_ingest(worker: IngestWorker, expected: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while worker.released_total + worker.rejected_total < expected:
        assert time.monotonic() < deadline, (worker.released_total, worker.rejected_total, expected)
        worker.run_once(0.2)


@pytest.fixture
def worker(kafka: KafkaSettings, topics: TopicSettings, ingest_settings: IngestSettings):
    w = IngestWorker(kafka, topics, ingest_settings)
    yield w
    w.close()


def bundles_of(records: list[Record]) -> list[tuple[int, Any]]:
    return [(r.partition, item) for r in records for item in decode_bundle(r.value).items]


def test_valid_events_become_bundles_on_their_keys_partition(
    kafka: KafkaSettings, topics: TopicSettings, worker: IngestWorker
) -> None:
    events = valid_events()
    with TouchpointProducer(kafka, topics) as producer:
        for ev in events:
            assert producer.send(ev) is None
        assert producer.flush() == 0
    run_ingest(worker, len(events))

    records = read_topic(
        kafka,
        topics.validated,
        until=lambda rs: sum(isinstance(i, Touchpoint) for _p, i in bundles_of(rs)) >= len(events),
    )
    items = bundles_of(records)
    partition_of = Partitioner(topics.partitions)
    seen = [i.event.event_id for _p, i in items if isinstance(i, Touchpoint)]
    assert sorted(seen) == sorted(e["event_id"] for e in events)
    for partition, item in items:
        if isinstance(item, Touchpoint):
            assert partition == partition_of(item.key)
            assert item.key == (item.event.customer_id or item.event.anonymous_id)
    links = [(p, i) for p, i in items if isinstance(i, Link)]
    assert [(i.anonymous_id, i.customer_id) for _p, i in links] == [("anon-abc", "cust-3")]
    assert links[0][0] == partition_of("anon-abc")
    by_id = {i.event.event_id: i for _p, i in items if isinstance(i, Touchpoint)}
    assert by_id["eo-1"].ts == BASE_MS + 120  # 09:15:00.120+01:00 is 08:15:00.120Z
    assert by_id["pf-1"].stage == 2 and by_id["sr-1"].stage == 3
    assert properties_of(by_id["pf-1"].event) == {"reason": "gateway_error"}
    # The event is passed through as the producer sent it.
    sent = {e["event_id"]: e for e in events}
    assert properties_of(by_id["sr-1"].event) == sent["sr-1"]["properties"]
    assert by_id["eo-1"].event.channel == "email"
    assert worker.rejected_total == 0


def test_every_malformed_input_lands_in_the_dead_letter_topic_with_its_reason(
    kafka: KafkaSettings, topics: TopicSettings, worker: IngestWorker
) -> None:
    raw_topic = topics.raw("web")
    with TouchpointProducer(kafka, topics) as producer:
        for i, (payload, _reason) in enumerate(BAD_INPUTS):
            producer.send_raw(raw_topic, payload, key=f"k{i}".encode() if i % 2 else None)
        producer.send(GOOD)  # one good event among them
        assert producer.flush() == 0
    run_ingest(worker, len(BAD_INPUTS) + 1)

    raw = read_topic(kafka, raw_topic, until=at_least(len(BAD_INPUTS) + 1))
    coordinates = {r.value: (r.partition, r.offset, r.key) for r in raw}
    dead = read_topic(kafka, topics.deadletter, until=at_least(len(BAD_INPUTS)))
    assert len(dead) == len(BAD_INPUTS)
    got: dict[bytes, dict[str, Any]] = {}
    for record in dead:
        doc = jsonio.loads(record.value)
        assert_valid_record(doc)
        payload = original_payload(doc)
        if doc["payload_truncated"]:
            payload = next(
                v for v in coordinates if hashlib.sha256(v).hexdigest() == doc["payload_sha256"]
            )
        else:
            assert hashlib.sha256(payload).hexdigest() == doc["payload_sha256"]
        got[payload] = doc
    for payload, reason in BAD_INPUTS:
        doc = got[payload]
        assert doc["reason"] == reason, (payload[:80], doc["detail"])
        partition, offset, key = coordinates[payload]
        assert doc["source"]["topic"] == raw_topic
        assert (doc["source"]["partition"], doc["source"]["offset"]) == (partition, offset)
        assert doc["payload_size"] == len(payload)
        if key is not None:
            assert base64.b64decode(doc["source"]["key_b64"]) == key
        assert doc["detail"]
    assert worker.events_total == 1


def test_a_foreign_client_can_publish(
    kafka: KafkaSettings, topics: TopicSettings, worker: IngestWorker
) -> None:
    """aiokafka (the client Faust uses) publishes a plain JSON event; ingest accepts it."""
    import asyncio

    from aiokafka import AIOKafkaProducer

    doc = page_view("foreign-1", customer_id="cust-foreign")

    async def publish() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers)
        await producer.start()
        try:
            await producer.send_and_wait(
                topics.raw("web"), json.dumps(doc).encode(), key=b"cust-foreign"
            )
        finally:
            await producer.stop()

    asyncio.run(publish())
    run_ingest(worker, 1)
    records = read_topic(kafka, topics.validated, until=at_least(1))
    (item,) = [i for _p, i in bundles_of(records)]
    assert isinstance(item, Touchpoint) and item.event.event_id == "foreign-1"
    assert worker.rejected_total == 0


def _kafka_up(client: str) -> float | None:
    from prometheus_client import REGISTRY

    return REGISTRY.get_sample_value("touchpoint_kafka_up", {"client": client})


def test_kafka_up_is_1_with_the_broker_and_0_without(
    kafka: KafkaSettings, topics: TopicSettings, ingest_settings: IngestSettings
) -> None:
    import contextlib

    from confluent_kafka import Producer

    from touchpoint import metrics
    from touchpoint.broker import free_port
    from touchpoint.producer import broker_health

    for client in ("ingest_consumer", "ingest_producer"):
        with contextlib.suppress(KeyError):
            metrics.KAFKA_UP.remove(client)  # earlier tests of this process may have set it
    fast = kafka.model_copy(update={"statistics_interval_ms": 200})
    worker = IngestWorker(fast, topics, ingest_settings)
    try:
        deadline = time.monotonic() + 30
        while _kafka_up("ingest_consumer") != 1 or _kafka_up("ingest_producer") != 1:
            assert time.monotonic() < deadline, "no statistics with a connected broker"
            worker.run_once(0.2)
    finally:
        worker.close()

    nowhere = KafkaSettings(
        bootstrap_servers=f"127.0.0.1:{free_port()}", statistics_interval_ms=200
    )
    producer = Producer({**nowhere.librdkafka(), **broker_health(nowhere, "test_nowhere")})
    deadline = time.monotonic() + 30
    while _kafka_up("test_nowhere") != 0:
        assert time.monotonic() < deadline, "no statistics from a client without a broker"
        producer.poll(0.2)
