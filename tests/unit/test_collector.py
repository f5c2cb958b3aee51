"""The HTTP collector's pure parts: auth, rate limit, bodies, verdicts, CORS (no server, no broker)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from schemas.decoder import EventDecoder, Rejection
from sinks.deadletter import original_payload
from tests.events import event, page_view
from tests.integration.test_ingest import BAD_INPUTS
from tests.reference import assert_valid_record
from tests.strategies import mutated_events
from tests.unit.test_schema_lockstep import CORPUS
from touchpoint import jsonio
from touchpoint.cli import main
from touchpoint.collector import (
    JSON,
    JSON_LINES,
    Authenticator,
    Collector,
    RateLimiter,
    RequestRefused,
    body_format,
    cors_headers,
    fingerprint,
    judge,
    split_body,
    status_of,
)
from touchpoint.config import CollectorSettings, IngestSettings, KafkaSettings, TopicSettings

TOKEN_A = "tok-a-0123456789abcdef"
TOKEN_B = "tok-b-fedcba9876543210"
TOPICS = TopicSettings(prefix="tp")
DECODER = EventDecoder(max_payload_bytes=16_384, max_future_skew_s=300)


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def reasons(verdicts: list[Any]) -> list[str | None]:
    return [v.rejection.reason if v.rejection else None for v in verdicts]


def decoder_reason(data: bytes) -> str | None:
    result = DECODER.validate(data)
    return result.reason if isinstance(result, Rejection) else None


# ---------------------------------------------------------------- rate limit
def test_bucket_grants_the_burst_then_refills_at_the_rate() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=5, burst=10, clock=clock)
    assert limiter.acquire("k", 10) == 0.0
    assert limiter.acquire("k", 1) == pytest.approx(0.2)
    clock.now += 0.2
    assert limiter.acquire("k", 1) == 0.0
    assert limiter.acquire("k", 1) > 0
    clock.now += 1.0  # 5 tokens back
    assert limiter.acquire("k", 10) == pytest.approx(1.0)  # a refusal takes nothing...
    assert limiter.acquire("k", 5) == 0.0  # ...so the 5 saved tokens are still there
    clock.now += 3600
    assert limiter.acquire("k", 10) == 0.0  # never more than the burst is saved up
    assert limiter.acquire("k", 1) > 0


def test_buckets_are_per_key_and_bounded() -> None:
    clock = FakeClock()
    limiter = RateLimiter(rate=1, burst=3, clock=clock, max_keys=2)
    assert limiter.acquire("a", 3) == 0.0
    assert limiter.acquire("b", 3) == 0.0
    assert limiter.acquire("a", 1) > 0
    assert limiter.acquire("c", 1) == 0.0  # evicts "b", the least recently used
    assert len(limiter) == 2
    assert limiter.acquire("a", 1) > 0


def test_a_cost_above_the_burst_is_a_programming_error() -> None:
    with pytest.raises(ValueError, match="never be granted"):
        RateLimiter(rate=1, burst=3).acquire("k", 4)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(min_value=0, max_value=2), st.integers(min_value=1, max_value=10)),
        max_size=60,
    )
)
def test_granted_events_never_exceed_burst_plus_rate_times_elapsed(
    steps: list[tuple[float, int]],
) -> None:
    clock = FakeClock(0.0)
    limiter = RateLimiter(rate=4, burst=10, clock=clock)
    granted = 0
    for dt, cost in steps:
        clock.now += dt
        wait = limiter.acquire("k", cost)
        if wait == 0.0:
            granted += cost
        else:
            assert wait > 0
        assert granted <= 10 + 4 * clock.now + 1e-9


# ---------------------------------------------------------------- auth
def test_tokens_are_checked_and_never_kept_in_clear() -> None:
    auth = Authenticator([TOKEN_A, TOKEN_B])
    assert auth.check(f"Bearer {TOKEN_A}").name == f"token {fingerprint(TOKEN_A)}"
    assert auth.check(f"bearer  {TOKEN_B} ").key == f"token:{fingerprint(TOKEN_B)}"
    assert TOKEN_A not in repr(auth) and TOKEN_A not in repr(vars(auth))
    cases = [
        (None, "missing_token"),
        ("", "missing_token"),
        ("Bearer", "invalid_token"),
        ("Bearer ", "invalid_token"),
        (f"Basic {TOKEN_A}", "invalid_token"),
        (f"Bearer {TOKEN_A}x", "invalid_token"),
        (f"Bearer {TOKEN_A[:-1]}", "invalid_token"),
        ("Bearer caf\u00e9-\udcff", "invalid_token"),
    ]
    for header, code in cases:
        with pytest.raises(RequestRefused) as refused:
            auth.check(header)
        assert (refused.value.status, refused.value.code) == (401, code), header
        assert "WWW-Authenticate" in refused.value.headers
        assert TOKEN_A not in str(refused.value)


def test_anonymous_callers_are_keyed_by_address() -> None:
    auth = Authenticator([], allow_anonymous=True)
    assert auth.check(None, "10.0.0.1").key == "addr:10.0.0.1"
    assert auth.check("Bearer whatever", "10.0.0.2").key == "addr:10.0.0.2"
    with pytest.raises(ValueError):
        Authenticator([])


def test_settings_refuse_to_start_without_tokens_unless_anonymous_is_explicit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in ("TOKENS", "ALLOW_ANONYMOUS"):
        monkeypatch.delenv(f"TOUCHPOINT_COLLECTOR_{name}", raising=False)
    with pytest.raises(ValueError, match="no tokens configured"):
        CollectorSettings()
    assert CollectorSettings(allow_anonymous=True).token_list() == ()
    with pytest.raises(ValueError, match="choose one"):
        CollectorSettings(tokens=TOKEN_A, allow_anonymous=True)
    with pytest.raises(ValueError, match="at least 16"):
        CollectorSettings(tokens="short")
    with pytest.raises(ValueError, match="max_batch_events"):
        CollectorSettings(tokens=TOKEN_A, max_batch_events=100, rate_limit_burst=99)
    both = CollectorSettings(tokens=f"{TOKEN_A}, {TOKEN_B}", cors_origins="https://a, https://b")
    assert both.token_list() == (TOKEN_A, TOKEN_B)
    assert both.cors_origins == ("https://a", "https://b")
    assert TOKEN_A not in repr(both) and TOKEN_A not in str(both.model_dump())


def test_the_cli_refuses_to_start_without_tokens() -> None:
    result = CliRunner().invoke(main, ["collector"], env={"TOUCHPOINT_COLLECTOR_TOKENS": ""})
    assert result.exit_code == 2
    assert "TOUCHPOINT_COLLECTOR_ALLOW_ANONYMOUS" in result.output


def test_the_cli_never_echoes_a_refused_token() -> None:
    result = CliRunner().invoke(main, ["collector"], env={"TOUCHPOINT_COLLECTOR_TOKENS": "s3cr3t"})
    assert result.exit_code == 2
    assert "at least 16" in result.output and "s3cr3t" not in result.output


# ---------------------------------------------------------------- bodies
def test_content_types() -> None:
    assert body_format(None) == JSON
    assert body_format("application/json; charset=utf-8") == JSON
    assert body_format("text/plain;charset=UTF-8") == JSON  # browsers: no preflight
    assert body_format("application/x-ndjson") == JSON_LINES
    assert body_format("Application/JSONL") == JSON_LINES
    with pytest.raises(RequestRefused) as refused:
        body_format("application/x-www-form-urlencoded")
    assert refused.value.status == 415


def test_a_json_array_is_split_into_the_exact_bytes_sent() -> None:
    body = b' [ {"a": 1},\n  {"b": [1, 2]} ,"x", 42 ] '
    assert split_body(body, JSON, 10) == [b'{"a": 1}', b'{"b": [1, 2]}', b'"x"', b"42"]


def test_anything_but_an_array_is_one_event_even_if_broken() -> None:
    for body in [b'{"a": 1}', b"{not json", b"  null ", b"\xff\xfe{}"]:
        assert split_body(body, JSON, 10) == [body]


def test_json_lines_skip_blank_lines() -> None:
    body = b'{"a":1}\r\n\n  \n{"b":2}\nnot json\n'
    assert split_body(body, JSON_LINES, 10) == [b'{"a":1}', b'{"b":2}', b"not json"]


@pytest.mark.parametrize(
    ("body", "fmt", "status", "code"),
    [
        (b"", JSON, 400, "empty_batch"),
        (b"  \n", JSON, 400, "empty_batch"),
        (b"[]", JSON, 400, "empty_batch"),
        (b"\n\n", JSON_LINES, 400, "empty_batch"),
        (b"[1,2,3,4]", JSON, 413, "too_many_events"),
        (b"1\n2\n3\n4", JSON_LINES, 413, "too_many_events"),
    ],
)
def test_empty_and_oversized_batches_are_refused(
    body: bytes, fmt: str, status: int, code: str
) -> None:
    with pytest.raises(RequestRefused) as refused:
        split_body(body, fmt, 3)
    assert (refused.value.status, refused.value.code) == (status, code)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b'[{"a": 1}, {"b"', "malformed_json"),
        (b"[1 2]", "malformed_json"),
        (b'[{"a": 1}] trailing', "malformed_json"),
        (b'["\\udc00"]', "invalid_encoding"),
        (b"[" * 100_000 + b"]" * 100_000, "too_deeply_nested"),
    ],
)
def test_an_array_that_does_not_parse_is_one_rejection(body: bytes, reason: str) -> None:
    result = split_body(body, JSON, 10)
    assert isinstance(result, Rejection) and result.reason == reason, result


# ---------------------------------------------------------------- verdicts
def test_verdicts_are_the_decoders_for_every_bad_input() -> None:
    payloads = [p for p, _ in BAD_INPUTS] + CORPUS
    verdicts = judge(DECODER, payloads, TOPICS, None)
    assert reasons(verdicts) == [decoder_reason(p) for p in payloads]
    for verdict in verdicts:
        if verdict.rejection is not None:
            assert verdict.result()["reason"] == verdict.rejection.reason
            assert verdict.result()["status"] == "rejected"
    # The ingest corpus carries its expected reasons: the collector gives the same ones.
    assert reasons(verdicts[: len(BAD_INPUTS)]) == [r for _, r in BAD_INPUTS]


def test_bad_inputs_inside_batches_get_the_same_verdicts() -> None:
    good = jsonio.dumps(page_view("g-1"))
    lines = [p for p, _ in BAD_INPUTS if p.strip() and b"\n" not in p]
    split = split_body(b"\n".join([good, *lines]), JSON_LINES, 1000)
    assert isinstance(split, list)
    assert reasons(judge(DECODER, split, TOPICS, None)) == [None, *map(decoder_reason, lines)]
    elements = [p for p in lines if isinstance(split_body(b"[" + p + b"]", JSON, 2), list)]
    assert len(elements) > 20  # most bad inputs are still JSON values
    split = split_body(b"[" + b",\n".join([good, *elements]) + b"]", JSON, 1000)
    assert split == [good, *elements]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(mutated_events(), min_size=1, max_size=8))
def test_a_batch_gets_the_verdicts_its_events_get_one_by_one(events: list[Any]) -> None:
    try:
        singles = [json.dumps(e, allow_nan=False).encode() for e in events]
    except ValueError:
        assume(False)  # NaN/Infinity are not JSON: a body holding them is malformed as a whole
    expected = [decoder_reason(s) for s in singles]
    for body, fmt in [
        (json.dumps(events, allow_nan=False).encode(), JSON),
        (b"\n".join(singles), JSON_LINES),
    ]:
        split = split_body(body, fmt, 100)
        assert split == singles
        assert reasons(judge(DECODER, split, TOPICS, None)) == expected


def test_accepted_events_are_keyed_and_routed_like_the_producer() -> None:
    events = [
        page_view("w", customer_id="cust-1"),
        event(
            "ad_click", "s", customer_id=None, anonymous_id="anon-1", channel="ads", campaign_id="c"
        ),
        event("screen_view", "a", customer_id="cust-2", channel="app", screen="home"),
        event("store_visit", "st", customer_id="cust-3", channel="store", store_id="s1"),
    ]
    verdicts = judge(DECODER, [jsonio.dumps(e) for e in events], TOPICS, None)
    assert [(v.topic, v.key, v.event_id) for v in verdicts] == [
        ("tp.web", b"cust-1", "w"),
        ("tp.web", b"anon-1", "s"),
        ("tp.app", b"cust-2", "a"),
        ("tp.store", b"cust-3", "st"),
    ]
    named = judge(DECODER, [jsonio.dumps(e) for e in events], TOPICS, "support")
    assert {v.topic for v in named} == {"tp.support"}


def test_rejected_events_name_the_topic_they_were_meant_for() -> None:
    bad_email = {**event("email_open", "e", channel="email", campaign_id="c"), "extra": 1}
    payloads = [jsonio.dumps(bad_email), b"{not json", b'{"channel": "store"}']
    verdicts = judge(DECODER, payloads, TOPICS, None)
    assert [v.topic for v in verdicts] == ["tp.email", "tp.web", "tp.store"]
    assert all(v.key is None for v in verdicts)


def test_a_channel_without_a_configured_source_is_not_published_blindly() -> None:
    topics = TopicSettings(prefix="tp", sources="web,app")
    visit = event("store_visit", "x", channel="store", store_id="s1")
    verdicts = judge(DECODER, [jsonio.dumps(visit)], topics, None)
    assert verdicts[0].rejection is not None
    assert verdicts[0].rejection.path == "$.channel"


def test_status_codes() -> None:
    ok, bad = judge(DECODER, [jsonio.dumps(page_view("x")), b"{"], TOPICS, None)
    assert status_of([ok, ok]) == 200
    assert status_of([ok, bad]) == 207
    assert status_of([bad]) == 400


def test_dead_letters_follow_the_published_schema() -> None:
    collector = Collector(
        KafkaSettings(),
        TOPICS,
        CollectorSettings(tokens=TOKEN_A),
        IngestSettings(deadletter_payload_max_bytes=1024),
        clock=lambda: 1_795_000_000.0,
    )
    for payload in [b"{not json", b"x" * 5000, jsonio.dumps({**page_view("x"), "extra": 1})]:
        (verdict,) = judge(collector.decoder, [payload], TOPICS, None)
        assert verdict.rejection is not None
        record = jsonio.loads(collector._dead_letter(verdict.rejection, payload, verdict.topic))
        assert_valid_record(record)
        assert record["stage"] == "collector"
        assert record["source"] == {
            "topic": "tp.web",
            "partition": -1,
            "offset": -1,
            "timestamp_ms": -1,
        }
        assert record["reason"] == verdict.rejection.reason
        assert original_payload(record) == payload[:1024]
        assert record["received_at"] == "2026-11-18T11:06:40.000Z"  # the injected clock


# ---------------------------------------------------------------- CORS
def test_cors_headers_only_for_allowed_origins() -> None:
    allowed = ("https://shop.example",)
    simple = cors_headers("https://shop.example", allowed)
    assert simple is not None
    assert simple["Access-Control-Allow-Origin"] == "https://shop.example"
    assert simple["Access-Control-Expose-Headers"] == "Retry-After"
    assert cors_headers("https://evil.example", allowed) is None
    assert cors_headers(None, allowed) is None
    assert cors_headers("https://shop.example", ()) is None
    pre = cors_headers("https://shop.example", allowed, preflight=True)
    assert pre is not None
    assert "Authorization" in pre["Access-Control-Allow-Headers"]
    assert "POST" in pre["Access-Control-Allow-Methods"]
    anyone = cors_headers("https://x.example", ("*",))
    assert anyone is not None and anyone["Access-Control-Allow-Origin"] == "*"
