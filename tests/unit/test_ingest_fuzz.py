"""Fuzzing the pure ingest transform: whatever the bytes, no exception and a documented outcome.

Every input must end as exactly one of: a bundled touchpoint the journey stage
can decode (and that the reference JSON Schema validator accepts), or a dead
letter whose reason is in the documented set, that validates against the
dead-letter schema and keeps the original bytes and Kafka coordinates. A
``processing_error`` dead letter means an unexpected exception was caught: it
fails here, because it is a bug (ingest survives it, but the reason is useless).

Strategies, 10,400 examples in all (each a batch of 1-3 messages): arbitrary
bytes, byte-level mutations of valid events (truncation, splicing, hostile
tokens), structured invalid values (wrong types, extreme numbers, long and
odd strings, boundary times), and batches mixing all of them. Derandomized, so
every run checks the same inputs.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
from typing import Any

import confluent_kafka
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.decoder import REASONS, EventDecoder, Rejection
from schemas.registry import event_schemas
from streams.bundles import Link, Partitioner, Touchpoint, decode_bundle, encode_bundle
from streams.ingest import Ingestor
from tests.reference import assert_valid_record, reference_verdict
from tests.strategies import ANY_JSON, near_miss_datetimes
from touchpoint import jsonio
from touchpoint.simulator import Simulator

NOW_S = 4_102_444_800.0  # 2100-01-01: most generated event times are in the past
NOW_MS = int(NOW_S * 1000)
MAX_BYTES = 16_384
DEAD_MAX_BYTES = 512  # small, so truncated dead letters are fuzzed too
DECODER = EventDecoder(max_payload_bytes=MAX_BYTES, max_future_skew_s=300, clock=lambda: NOW_S)
MIN_MS, MAX_MS = DECODER.time_bounds()
TOPIC = "tp.web"


def fuzz(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


KEYS = st.none() | st.binary(max_size=40) | st.just(b"k" * 3000)


def ingest_and_check(values: list[bytes | None], keys: list[bytes | None]) -> None:
    """Run one batch through the Ingestor and check the fate of every input."""
    messages = [
        confluent_kafka.Message(
            topic=TOPIC,
            partition=i % 3,
            offset=1000 + i,
            key=key,
            value=value,
            timestamp=(1, NOW_MS),
        )
        for i, (value, key) in enumerate(zip(values, keys, strict=True))
    ]
    ingestor = Ingestor(
        DECODER, Partitioner(4), {TOPIC: "web"}, deadletter_payload_max_bytes=DEAD_MAX_BYTES
    )
    result = ingestor.process(messages, NOW_MS)

    accepted: dict[int, tuple[int, int, Any]] = {}
    for (_topic, partition), entries in result.entries.items():
        for ts, offset, target, item in entries:
            if isinstance(item, tuple):
                assert offset not in accepted
                accepted[offset] = (ts, target, item)
            else:
                assert isinstance(item, Link) and offset in accepted
            assert partition == (offset - 1000) % 3
    dead: dict[int, tuple[bytes | None, dict[str, Any]]] = {}
    for key, value in result.dead:
        doc = jsonio.loads(value)
        offset = doc["source"]["offset"]
        assert offset not in dead and offset not in accepted
        dead[offset] = (key, doc)
    assert len(accepted) + len(dead) == len(values)

    partition_of = Partitioner(4)
    for i, (value, key) in enumerate(zip(values, keys, strict=True)):
        offset = 1000 + i
        data = value or b""
        verdict = DECODER.validate(data)
        if offset in accepted:
            assert not isinstance(verdict, Rejection), verdict
            event, ts = verdict
            got_ts, target, item = accepted[offset]
            assert got_ts == ts and MIN_MS <= ts <= MAX_MS
            # The journey stage can read what ingest bundled.
            (tp,) = decode_bundle(encode_bundle([item], NOW_MS)).items
            assert isinstance(tp, Touchpoint) and tp.ts == ts
            assert tp.event.event_id == event.event_id
            expected_key = event.anonymous_id if tp.event.customer_id is None else event.customer_id
            assert tp.key == expected_key and target == partition_of(tp.key)
            assert reference_verdict(data), data[:300]
            continue
        dead_key, doc = dead[offset]
        assert dead_key == key
        assert_valid_record(doc)
        assert doc["reason"] in REASONS and doc["reason"] != "processing_error", doc
        assert isinstance(verdict, Rejection) and doc["reason"] == verdict.reason
        source = doc["source"]
        assert (source["topic"], source["partition"]) == (TOPIC, i % 3)
        assert source["timestamp_ms"] == NOW_MS
        if key is None:
            assert "key_b64" not in source
        else:
            assert base64.b64decode(source["key_b64"]) == key[:1024]
        assert doc["payload_size"] == len(data)
        assert doc["payload_sha256"] == hashlib.sha256(data).hexdigest()
        assert doc["payload_truncated"] == (len(data) > DEAD_MAX_BYTES)
        assert base64.b64decode(doc["payload_b64"]) == data[:DEAD_MAX_BYTES]


# ---------------------------------------------------------------- strategies
def _pool() -> list[bytes]:
    """Valid events to mutate: every schema's examples and simulated traffic (cheap to draw)."""
    events = [example for doc in event_schemas().values() for example in doc["examples"]]
    simulated = Simulator(seed=7, start_ms=1_793_607_300_000, rate=50.0, customers=200).events()
    events += [event for _source, event in itertools.islice(simulated, 600)]
    pool = [jsonio.dumps(event) for event in events]
    assert all(not isinstance(DECODER.validate(data), Rejection) for data in pool)
    return pool


POOL = _pool()
VALID = st.sampled_from(POOL)
HOSTILE_TOKENS = [
    b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-0", b"9" * 30, b"null", b"true",
    b"\\ud800", b"\\udc00", b"\\u0000", b"\x00", b"\xef\xbb\xbf", b"\xc0\xaf", b"\xed\xa0\x80",
    b"\xff", b"\xe2\x82", b"\x80", b'"', b"\\", b",", b":", b"{", b"}", b"[", b"]",
    b"[" * 2000, b'{"a":' * 300, b'"schema":', b'"event_id":"dup",', b'"customer_id":"",',
    b'"occurred_at":"0000-01-01T00:00:00Z",', b'"occurred_at":-1,', b'"__proto__":{},',
    b"\n", b"\t", b" " * 50, b"x" * 5000,
]  # fmt: skip


@st.composite
def byte_mutations(draw: st.DrawFn) -> bytes:
    """A valid event's bytes with 1-4 byte-level edits."""
    data = bytearray(draw(VALID))
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        op = draw(st.sampled_from(["flip", "delete", "insert", "truncate", "splice", "token"]))
        at = draw(st.integers(min_value=0, max_value=len(data)))
        if op == "flip" and at < len(data):
            data[at] = draw(st.integers(min_value=0, max_value=255))
        elif op == "delete":
            del data[at : at + draw(st.integers(min_value=1, max_value=8))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del data[at:]
        elif op == "splice":
            start = draw(st.integers(min_value=0, max_value=len(data)))
            data[at:at] = data[start : start + draw(st.integers(min_value=1, max_value=40))]
        else:
            data[at:at] = draw(st.sampled_from(HOSTILE_TOKENS))
    return bytes(data)


EXTREMES = st.sampled_from(
    [
        2**63 - 1, 2**63, 2**64, -(2**63), 10**400 // 10**370, 1e308, -0.0, 5e-324,
        MIN_MS - 1, MIN_MS, MAX_MS, MAX_MS + 1, 253_402_300_799_999, 253_402_300_800_000,
        "", " ", "\x00", "\ud800", "\U0001f600" * 40, "x" * 129, "x" * 2049, "y" * 20_000,
        "0000-01-01T00:00:00Z", "9999-12-31T23:59:59.999999999-23:59",
        "2099-12-31T23:59:59Z", "2100-01-01T00:05:00Z", "2100-01-01T00:05:00.001Z",
        "iglu:com.touchpoint/page_view/jsonschema/1-0-0", [], {}, [[[]]], {"": {}},
    ]
)  # fmt: skip
STRUCTURED_VALUE = (
    EXTREMES
    | ANY_JSON
    | near_miss_datetimes()
    | st.text(max_size=300)
    | st.integers(min_value=-(2**70), max_value=2**70)
)


@st.composite
def structured_invalid(draw: st.DrawFn) -> bytes:
    """A valid event with fields replaced by odd values (at the top level or in properties)."""
    event = jsonio.loads(draw(VALID))
    target = event
    if isinstance(event.get("properties"), dict) and event["properties"] and draw(st.booleans()):
        target = event["properties"]
    for _ in range(draw(st.integers(min_value=1, max_value=3))):
        names = [*target, "customer_id", "anonymous_id", "session_hint", "extra"]
        name = draw(st.sampled_from(names))
        if draw(st.integers(min_value=0, max_value=9)) == 0:
            target.pop(name, None)
        else:
            target[name] = draw(STRUCTURED_VALUE)
    return json.dumps(event).encode()


ANY_INPUT = st.binary(max_size=400) | byte_mutations() | structured_invalid() | VALID | st.none()


def batches(values: st.SearchStrategy[Any]) -> st.SearchStrategy[tuple[list[Any], list[Any]]]:
    return st.integers(min_value=1, max_value=3).flatmap(
        lambda n: st.tuples(
            st.lists(values, min_size=n, max_size=n), st.lists(KEYS, min_size=n, max_size=n)
        )
    )


# ---------------------------------------------------------------- tests
@fuzz(2_500)
@given(batches(st.binary(max_size=600)))
def test_arbitrary_bytes(batch: tuple[list[bytes], list[bytes | None]]) -> None:
    ingest_and_check(*batch)


@fuzz(3_000)
@given(batches(byte_mutations()))
def test_byte_mutations_of_valid_events(batch: tuple[list[bytes], list[bytes | None]]) -> None:
    ingest_and_check(*batch)


@fuzz(3_000)
@given(batches(structured_invalid()))
def test_structured_invalid_values(batch: tuple[list[bytes], list[bytes | None]]) -> None:
    ingest_and_check(*batch)


@fuzz(1_900)
@given(batches(ANY_INPUT))
def test_mixed_batches(batch: tuple[list[bytes | None], list[bytes | None]]) -> None:
    ingest_and_check(*batch)


def test_regressions() -> None:
    """Inputs fuzzing once found troublesome (kept so they stay fixed)."""
    values: list[bytes | None] = [
        None,
        b"\xef\xbb\xbf{}",
        b'\x00{\x00"\x00',
        b'{"schema":"iglu:com.touchpoint/page_view/jsonschema/1-0-0","occurred_at":'
        b'"0000-01-01T00:00:00Z"}',
    ]
    ingest_and_check(values, [None, b"k", None, b"\xff" * 2000])
