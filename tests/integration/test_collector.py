"""The HTTP collector against the real (embedded) broker, hit by a real HTTP client (httpx).

Each test starts the aiohttp app on a free loopback port in a background
event loop, posts to it, and reads the raw and dead-letter topics back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import socket
import threading
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import httpx
import msgspec
import pytest
from aiohttp import web

from sinks.deadletter import original_payload
from tests.events import event, page_view
from tests.integration.test_ingest import BAD_INPUTS
from tests.kafka_helpers import Record, at_least, read_topic
from tests.reference import assert_valid_record
from touchpoint import jsonio
from touchpoint.collector import Collector, create_app, fingerprint
from touchpoint.config import CollectorSettings, IngestSettings, KafkaSettings, TopicSettings
from touchpoint.topics import ensure_topics

TOKEN = "tok-int-5f1e0c7a9b3d4e21"
OTHER_TOKEN = "tok-int-other-88c2d6e4f0a1"
ORIGIN = "https://shop.example"


@dataclass
class Running:
    url: str
    collector: Collector

    def client(self, token: str | None = TOKEN, **headers: str) -> httpx.Client:
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@contextmanager
def running_collector(
    kafka: KafkaSettings, topics: TopicSettings, **overrides: Any
) -> Iterator[Running]:
    """The collector's aiohttp app on 127.0.0.1:<free port>, served from a background loop."""
    options: dict[str, Any] = {
        "tokens": f"{TOKEN},{OTHER_TOKEN}",
        "cors_origins": (ORIGIN,),
        "max_body_bytes": 400_000,
        "max_batch_events": 100,
        **overrides,
    }
    collector = Collector(kafka, topics, CollectorSettings(**options), IngestSettings())
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="collector-test", daemon=True)
    thread.start()
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]

    async def start() -> web.AppRunner:
        runner = web.AppRunner(create_app(collector))
        await runner.setup()
        await web.SockSite(runner, sock).start()
        return runner

    runner = asyncio.run_coroutine_threadsafe(start(), loop).result(60)
    try:
        yield Running(f"http://127.0.0.1:{port}", collector)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


@pytest.fixture
def server(kafka: KafkaSettings, topics: TopicSettings) -> Iterator[Running]:
    ensure_topics(kafka, topics)
    with running_collector(kafka, topics) as started:
        yield started


def dead_letters(kafka: KafkaSettings, topics: TopicSettings, n: int) -> list[dict[str, Any]]:
    records = read_topic(kafka, topics.deadletter, until=at_least(n))
    docs = [jsonio.loads(r.value) for r in records]
    for doc in docs:
        assert_valid_record(doc)
        assert doc["stage"] == "collector"
        assert (doc["source"]["partition"], doc["source"]["offset"]) == (-1, -1)
    return docs


def payload_of(doc: dict[str, Any], candidates: list[bytes]) -> bytes:
    """The original bytes of a dead letter (found by SHA-256 when it kept only a prefix)."""
    if not doc["payload_truncated"]:
        return original_payload(doc)
    return next(c for c in candidates if hashlib.sha256(c).hexdigest() == doc["payload_sha256"])


def is_json_value(data: bytes) -> bool:
    try:
        msgspec.json.decode(data)
    except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
        return False
    return True


def valid_mix() -> list[dict[str, Any]]:
    return [
        page_view("c-web-1", customer_id="cust-1"),
        page_view("c-web-2", customer_id=None, anonymous_id="anon-9"),
        event("ad_click", "c-ads-1", customer_id="cust-2", channel="ads", campaign_id="cmp"),
        event("screen_view", "c-app-1", customer_id="cust-1", channel="app", screen="home"),
        event("email_open", "c-email-1", customer_id="cust-3", channel="email", campaign_id="c"),
        event("store_visit", "c-store-1", customer_id="cust-4", channel="store", store_id="s1"),
        event("support_contact", "c-sup-1", channel="support", medium="chat", topic="payment"),
    ]


def test_a_mixed_batch_publishes_the_valid_and_dead_letters_the_rest(
    kafka: KafkaSettings, topics: TopicSettings, server: Running
) -> None:
    good = [json.dumps(e, indent=2).encode() for e in valid_mix()]  # sent as pretty JSON
    bad = [p for p, _ in BAD_INPUTS if is_json_value(p)]  # the rest cannot sit in an array
    assert len(bad) > 20
    expected_reason = dict(BAD_INPUTS)
    payloads = [x for pair in zip(good, bad, strict=False) for x in pair]
    payloads += good[len(bad) :] + bad[len(good) :]
    body = b"[\n" + b",\n".join(payloads) + b"\n]"

    with server.client(Origin=ORIGIN) as client:
        response = client.post("/v1/events", content=body)
    assert response.status_code == 207, response.text
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    answer = response.json()
    assert (answer["accepted"], answer["rejected"]) == (len(good), len(bad))
    by_payload = dict(zip(payloads, answer["results"], strict=True))
    assert [r["index"] for r in answer["results"]] == list(range(len(payloads)))
    for payload in good:
        assert by_payload[payload]["status"] == "accepted"
        assert by_payload[payload]["event_id"] == json.loads(payload)["event_id"]
    for payload in bad:
        result = by_payload[payload]
        assert result["status"] == "rejected"
        assert result["reason"] == expected_reason[payload], (payload[:80], result)
        assert result["detail"]

    # Accepted events: on the raw topic of their channel, keyed by customer (else
    # anonymous) id, byte for byte as sent.
    expected: dict[str, set[tuple[bytes, bytes]]] = defaultdict(set)
    source_of = {"web": "web", "ads": "web", "app": "app", "email": "email"}
    source_of |= {"store": "store", "support": "support"}
    for payload in good:
        doc = json.loads(payload)
        key = (doc.get("customer_id") or doc["anonymous_id"]).encode()
        expected[topics.raw(source_of[doc["channel"]])].add((key, payload))
    for topic, wanted in expected.items():
        records = read_topic(kafka, topic, until=at_least(len(wanted)))
        assert {(r.key, r.value) for r in records} == wanted, topic

    # Rejected ones: dead-lettered with the same reason and their original bytes.
    docs = dead_letters(kafka, topics, len(bad))
    assert len(docs) == len(bad)
    got = {payload_of(doc, bad): doc for doc in docs}
    assert set(got) == set(bad)
    for payload in bad:
        assert got[payload]["reason"] == expected_reason[payload]
        assert got[payload]["source"]["topic"] == topics.raw("web")
        assert got[payload]["payload_size"] == len(payload)


def test_json_lines_to_a_named_source(
    kafka: KafkaSettings, topics: TopicSettings, server: Running
) -> None:
    events = [page_view(f"jl-{i}", customer_id=f"cust-{i}") for i in range(5)]
    invalid = jsonio.dumps({**page_view("jl-bad"), "properties": {}})
    body = b"\n".join(jsonio.dumps(e) for e in events) + b"\n\n" + invalid + b"\r\n"
    with server.client() as client:
        response = client.post(
            "/v1/events/support", content=body, headers={"Content-Type": "application/x-ndjson"}
        )
        unknown = client.post("/v1/events/fax", content=jsonio.dumps(events[0]))
    assert response.status_code == 207, response.text
    assert [r["status"] for r in response.json()["results"]] == ["accepted"] * 5 + ["rejected"]
    assert response.json()["results"][5]["reason"] == "missing_field"
    assert unknown.status_code == 404 and unknown.json()["error"] == "unknown_source"

    records = read_topic(kafka, topics.raw("support"), until=at_least(5))
    assert sorted(r.value for r in records) == sorted(jsonio.dumps(e) for e in events)
    (doc,) = dead_letters(kafka, topics, 1)
    assert doc["source"]["topic"] == topics.raw("support")
    assert original_payload(doc) == invalid


def test_single_events_and_unparseable_bodies(
    kafka: KafkaSettings, topics: TopicSettings, server: Running
) -> None:
    one = page_view("single-1", customer_id="cust-single")
    broken_array = b'[{"event_id": "a"}, {"schema": '
    with server.client() as client:
        ok = client.post("/v1/events", json=one)
        broken = client.post("/v1/events", content=b"{not json")
        whole = client.post("/v1/events", content=broken_array)
        empty = client.post("/v1/events", content=b"[]")
    assert ok.status_code == 200, ok.text
    assert ok.json() == {
        "accepted": 1,
        "rejected": 0,
        "results": [{"index": 0, "status": "accepted", "event_id": "single-1"}],
    }
    assert broken.status_code == 400
    assert broken.json()["results"][0]["reason"] == "malformed_json"
    assert whole.status_code == 400
    assert whole.json()["error"] == "malformed_json" and whole.json()["dead_lettered"] is True
    assert empty.status_code == 400 and empty.json()["error"] == "empty_batch"

    (record,) = read_topic(kafka, topics.raw("web"), until=at_least(1))
    assert (record.key, record.value) == (b"cust-single", jsonio.dumps(one))
    docs = dead_letters(kafka, topics, 2)
    assert sorted(original_payload(d) for d in docs) == sorted([b"{not json", broken_array])
    assert {d["reason"] for d in docs} == {"malformed_json"}


def assert_only_marker_arrives(
    kafka: KafkaSettings, topics: TopicSettings, server: Running, customer: str
) -> None:
    """Nothing refused was published: the customer's partition holds only a later marker.

    Refused requests carried valid events of ``customer``; had any been
    published, it would sit before the marker on the same partition.
    """
    marker = page_view("marker", customer_id=customer)
    with server.client(OTHER_TOKEN) as client:
        assert client.post("/v1/events", json=marker).status_code == 200
    records: list[Record] = read_topic(
        kafka, topics.raw("web"), until=lambda rs: any(r.value == jsonio.dumps(marker) for r in rs)
    )
    assert [r.value for r in records] == [jsonio.dumps(marker)]


def test_missing_wrong_tokens_and_oversize_bodies_are_refused_and_nothing_is_written(
    kafka: KafkaSettings, topics: TopicSettings, server: Running
) -> None:
    customer = "cust-refused"
    valid = jsonio.dumps(page_view("refused", customer_id=customer))
    filler = {**page_view("big", customer_id=customer), "properties": {"url": "/" + "a" * 1000}}
    huge = jsonio.dumps([filler] * 500)  # ~550 KB > 400 KB
    assert len(huge) > 400_000

    def chunks() -> Iterator[bytes]:  # no Content-Length: Transfer-Encoding: chunked
        for start in range(0, len(huge), 50_000):
            yield huge[start : start + 50_000]

    with server.client(token=None) as anonymous, server.client() as client:
        missing = anonymous.post("/v1/events", content=valid)
        wrong = anonymous.post(
            "/v1/events", content=valid, headers={"Authorization": f"Bearer {TOKEN}x"}
        )
        basic = anonymous.post(
            "/v1/events", content=valid, headers={"Authorization": f"Basic {TOKEN}"}
        )
        too_large = client.post("/v1/events", content=huge)
        too_large_chunked = client.post("/v1/events", content=chunks())
        too_many = client.post("/v1/events", content=b"[" + b",".join([valid] * 101) + b"]")
        form = client.post(
            "/v1/events", content=valid, headers={"Content-Type": "multipart/form-data"}
        )

    assert (missing.status_code, missing.json()["error"]) == (401, "missing_token")
    assert missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert (wrong.status_code, wrong.json()["error"]) == (401, "invalid_token")
    assert (basic.status_code, basic.json()["error"]) == (401, "invalid_token")
    for response in (missing, wrong, basic):
        assert TOKEN not in response.text
    assert (too_large.status_code, too_large.json()["error"]) == (413, "body_too_large")
    assert "chunked" in too_large_chunked.request.headers.get("Transfer-Encoding", "")
    assert (too_large_chunked.status_code, too_large_chunked.json()["error"]) == (
        413,
        "body_too_large",
    )
    assert (too_many.status_code, too_many.json()["error"]) == (413, "too_many_events")
    assert form.status_code == 415
    assert_only_marker_arrives(kafka, topics, server, customer)


def test_floods_are_rate_limited_per_token(kafka: KafkaSettings, topics: TopicSettings) -> None:
    ensure_topics(kafka, topics)
    # 0.001 events/s: nothing refills while the test runs, so the counts are exact.
    limits = {"rate_limit_per_s": 0.001, "rate_limit_burst": 5, "max_batch_events": 5}
    with running_collector(kafka, topics, **limits) as server:
        customer = "cust-flood"
        statuses = []
        retry_after = set()
        with server.client(Origin=ORIGIN) as client:
            batch = [page_view(f"b-{i}", customer_id="cust-batch") for i in range(3)]
            assert client.post("/v1/events", json=batch).status_code == 200  # costs 3
            for i in range(10):
                response = client.post(
                    "/v1/events", json=page_view(f"flood-{i}", customer_id=customer)
                )
                statuses.append(response.status_code)
                if response.status_code == 429:
                    assert response.json()["error"] == "rate_limited"
                    assert response.headers["Access-Control-Expose-Headers"] == "Retry-After"
                    retry_after.add(response.headers["Retry-After"])
            refused_batch = client.post("/v1/events", json=batch[:1])
        assert statuses == [200, 200] + [429] * 8
        assert refused_batch.status_code == 429
        assert retry_after == {"1000"}  # (1 - 0 tokens) / 0.001 per s

        # The other token has its own bucket.
        with server.client(OTHER_TOKEN) as other:
            assert other.post("/v1/events", json=page_view("other-1")).status_code == 200

        records = read_topic(
            kafka, topics.raw("web"), until=lambda rs: sum(r.key == b"cust-flood" for r in rs) >= 2
        )
        flood = [jsonio.loads(r.value)["event_id"] for r in records if r.key == b"cust-flood"]
        assert flood == ["flood-0", "flood-1"]


def test_cors_preflight_and_headers(server: Running) -> None:
    preflight = {"Access-Control-Request-Method": "POST"}
    with server.client(token=None) as client:
        allowed = client.options(
            "/v1/events/web",
            headers={
                **preflight,
                "Origin": ORIGIN,
                "Access-Control-Request-Headers": "authorization,content-type",
            },
        )
        other = client.options(
            "/v1/events", headers={**preflight, "Origin": "https://evil.example"}
        )
        unauthorized = client.post("/v1/events", content=b"{}", headers={"Origin": ORIGIN})
        foreign = client.post(
            "/v1/events", content=b"{}", headers={"Origin": "https://evil.example"}
        )
    assert allowed.status_code == 204
    assert allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "POST" in allowed.headers["Access-Control-Allow-Methods"]
    allowed_headers = allowed.headers["Access-Control-Allow-Headers"].lower()
    assert "authorization" in allowed_headers and "content-type" in allowed_headers
    assert int(allowed.headers["Access-Control-Max-Age"]) > 0
    assert other.status_code == 403
    assert "Access-Control-Allow-Origin" not in other.headers
    # Errors carry CORS headers too, or the browser could not read them.
    assert unauthorized.status_code == 401
    assert unauthorized.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "Access-Control-Allow-Origin" not in foreign.headers


def test_health_and_metrics(server: Running) -> None:
    with server.client() as client:
        client.post("/v1/events", json=[page_view("m-1", customer_id="cust-metrics"), {"x": 1}])
        health = client.get("/health")
        metrics = client.get("/metrics")
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    assert metrics.status_code == 200
    text = metrics.text
    assert 'touchpoint_collector_events_accepted_total{source="web"}' in text
    assert (
        'touchpoint_collector_events_rejected_total{reason="missing_schema",source="web"}' in text
    )
    assert 'touchpoint_collector_requests_total{status="207"}' in text
    assert "cust-metrics" not in text and TOKEN not in text and fingerprint(TOKEN) not in text


def test_tokens_never_appear_in_logs(
    kafka: KafkaSettings,
    topics: TopicSettings,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    ensure_topics(kafka, topics)
    caplog.set_level(logging.DEBUG)
    guess = TOKEN[:-1] + "0"  # a near miss is secret-looking too
    with running_collector(kafka, topics) as server:
        with server.client() as client:
            assert client.post("/v1/events", json=page_view("s-1")).status_code == 200
            assert client.post("/v1/events", content=b"[{").status_code == 400
            assert client.post("/v1/events", json=[page_view("s-2"), {}]).status_code == 207
        with server.client(guess) as client:
            assert client.post("/v1/events", json=page_view("s-3")).status_code == 401
        with server.client(token=None) as client:
            assert client.post("/v1/events", json=page_view("s-4")).status_code == 401
        assert TOKEN not in repr(server.collector.settings)
        assert TOKEN not in repr(server.collector.auth)
    captured = capfd.readouterr()
    logged = caplog.text + captured.out + captured.err
    # The capture works: the start-up line names the tokens by fingerprint, and
    # every request left an access-log line.
    assert fingerprint(TOKEN) in caplog.text
    assert caplog.text.count('"POST /v1/events HTTP/1.1"') == 5
    for secret in (TOKEN, OTHER_TOKEN, guess):
        assert secret not in logged
