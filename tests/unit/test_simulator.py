"""The traffic simulator: valid, deterministic, realistic, and incidents that show.

Three twelve-minute runs at 100 events/s with the same seed are shared by most
tests: normal traffic, a payment outage and an app error spike. With the same
seed the runs are identical until shortly before the incident, and alike in
everything but the incident after it, which is what the scenario tests compare.
"""

from __future__ import annotations

import collections
import re
import time
from collections.abc import Iterable
from itertools import islice
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.decoder import EventDecoder, Rejection
from schemas.registry import event_schemas, uri_for
from tests.reference import reference_verdict
from touchpoint import jsonio
from touchpoint.simulator import (
    INCIDENT_KINDS,
    SOURCE_OF_CHANNEL,
    Incident,
    Simulator,
    event_time_ms,
)

START = 1_793_606_400_000  # 2026-11-02T08:00:00Z
DECODER = EventDecoder(clock=lambda: 4e9)
SEED = 7
RATE = 100.0
RUN_S = 720
INCIDENT_AT, INCIDENT_FOR = 240, 240
EVENT_TYPES = {doc["self"]["name"] for doc in event_schemas().values()}

Stream = list[tuple[str, dict[str, Any]]]


def run(*incidents: str, seed: int = SEED, seconds: int = RUN_S, **kwargs: Any) -> Stream:
    sim = Simulator(
        seed=seed,
        start_ms=START,
        rate=RATE,
        incidents=[Incident.parse(text) for text in incidents],
        **kwargs,
    )
    return list(sim.until(START + seconds * 1000))


@pytest.fixture(scope="module")
def normal() -> Stream:
    return run()


@pytest.fixture(scope="module")
def outage() -> Stream:
    return run(f"payment_outage@{INCIDENT_AT}+{INCIDENT_FOR}")


@pytest.fixture(scope="module")
def app_errors() -> Stream:
    return run(f"app_errors@{INCIDENT_AT}+{INCIDENT_FOR}")


def seconds(event: dict[str, Any]) -> float:
    return (event_time_ms(event) - START) / 1000


def window(stream: Stream, start_s: float, end_s: float) -> list[dict[str, Any]]:
    return [e for _, e in stream if start_s <= seconds(e) < end_s]


def count(events: Iterable[dict[str, Any]], event_type: str, **props: Any) -> int:
    return sum(
        1
        for e in events
        if e["event_type"] == event_type
        and all(e["properties"].get(k) == v for k, v in props.items())
    )


# --- The contract -----------------------------------------------------------------------------


@pytest.mark.parametrize("stream", ["normal", "outage", "app_errors"])
def test_every_event_is_valid_and_routed_by_channel(stream: str, request: Any) -> None:
    events: Stream = request.getfixturevalue(stream)
    assert len(events) > 50_000
    for source, event in events:
        result = DECODER.validate(jsonio.dumps(event))
        assert not isinstance(result, Rejection), (result, event)
        _, decoded_ms = result
        assert decoded_ms == event_time_ms(event)
        assert event["schema"] == uri_for(event["event_type"])
        assert source == SOURCE_OF_CHANNEL[event["channel"]]


def test_a_standard_json_schema_validator_agrees(normal: Stream) -> None:
    # A few of every type, through the slow reference validator as well.
    seen: collections.Counter[str] = collections.Counter()
    for _, event in normal:
        if seen[event["event_type"]] < 20:
            seen[event["event_type"]] += 1
            assert reference_verdict(jsonio.dumps(event)), event
    assert set(seen) == EVENT_TYPES


def test_every_event_type_and_source_shows_up(normal: Stream) -> None:
    types = collections.Counter(e["event_type"] for _, e in normal)
    assert set(types) == EVENT_TYPES
    channels = collections.Counter(e["channel"] for _, e in normal)
    assert set(channels) == {"web", "app", "email", "store", "support", "social", "ads"}
    assert {source for source, _ in normal} == {"web", "app", "email", "store", "support"}
    # Browsing dominates, as it does in a real shop; purchases are a few percent.
    assert types["product_view"] > types["cart_add"] > types["purchase"] > types["payment_failed"]
    assert 0.005 < types["purchase"] / len(normal) < 0.05


def test_timestamps_mix_rfc3339_and_epoch_millis(normal: Stream) -> None:
    stamps = [e["occurred_at"] for _, e in normal]
    epoch = sum(isinstance(v, int) for v in stamps)
    assert 0.12 < epoch / len(stamps) < 0.18
    utc = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
    offsets = collections.Counter(
        e["channel"]
        for _, e in normal
        if isinstance(e["occurred_at"], str) and e["occurred_at"].endswith("+01:00")
    )
    assert set(offsets) == {"store"}
    assert all(isinstance(v, int) or utc.match(v) or v.endswith("+01:00") for v in stamps)


def test_event_time_ms_reads_both_forms() -> None:
    assert event_time_ms({"occurred_at": 1793610900120}) == 1793610900120
    assert event_time_ms({"occurred_at": "2026-11-02T09:15:00.120Z"}) == 1793610900120
    assert event_time_ms({"occurred_at": "2026-11-02T10:15:00.120+01:00"}) == 1793610900120
    assert event_time_ms({"occurred_at": "2026-11-02T09:15:00.120999999Z"}) == 1793610900120
    with pytest.raises(ValueError, match="offset"):
        event_time_ms({"occurred_at": "2026-11-02T09:15:00"})


# --- The stream -------------------------------------------------------------------------------


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    def first(seed: int) -> bytes:
        return jsonio.dumps(Simulator(seed=seed, start_ms=START, rate=RATE).take(3000))

    assert first(1) == first(1)
    assert first(1) != first(2)


def test_take_until_and_events_continue_one_stream() -> None:
    whole = Simulator(seed=3, start_ms=START, rate=50).take(3000)
    sim = Simulator(seed=3, start_ms=START, rate=50)
    pieces = sim.take(1000)
    cut = event_time_ms(pieces[-1][1]) + 5_000
    pieces += sim.until(cut)
    assert event_time_ms(pieces[-1][1]) < cut
    resumed_at = len(pieces)
    pieces += islice(sim.events(), 3000 - len(pieces))
    assert event_time_ms(pieces[resumed_at][1]) >= cut  # until() left it queued
    assert jsonio.dumps(pieces) == jsonio.dumps(whole)


def test_200k_events_are_unique_ordered_and_fast(capsys: pytest.CaptureFixture[str]) -> None:
    sim = Simulator(seed=11, start_ms=START, rate=RATE)
    began = time.perf_counter()
    events = sim.take(200_000)
    elapsed = time.perf_counter() - began
    with capsys.disabled():
        print(f"\nsimulator: {len(events) / elapsed:,.0f} events/s (200k events, take())")
    ids = [e["event_id"] for _, e in events]
    assert len(set(ids)) == len(ids)
    assert max(map(len, ids)) <= 64
    times = [event_time_ms(e) for _, e in events]
    assert times == sorted(times)
    assert sim.stats == collections.Counter(e["event_type"] for _, e in events)


@pytest.mark.parametrize("rate", [20.0, 200.0, 1000.0])
def test_rate_is_honoured_from_the_start(rate: float) -> None:
    first = Simulator(seed=5, start_ms=START, rate=rate).take(10_000)
    span_s = (event_time_ms(first[-1][1]) - START) / 1000
    assert 0.75 < span_s / (10_000 / rate) < 1.25


@pytest.mark.parametrize("rate", [5.0, 100.0])
def test_rate_is_honoured_in_steady_state(rate: float) -> None:
    sim = Simulator(seed=5, start_ms=START, rate=rate)
    collections.deque(sim.until(START + 300_000), maxlen=0)
    for minute in range(5, 8):
        events = list(sim.until(START + (minute + 1) * 60_000))
        assert 0.9 < len(events) / (60 * rate) < 1.1, minute


def test_incidents_leave_the_event_rate_alone(
    normal: Stream, outage: Stream, app_errors: Stream
) -> None:
    during = INCIDENT_AT, INCIDENT_AT + INCIDENT_FOR
    expected = RATE * INCIDENT_FOR
    for stream in (normal, outage, app_errors):
        assert 0.9 < len(window(stream, *during)) / expected < 1.1


# --- Who the visitors are ---------------------------------------------------------------------


def test_anonymous_visitors_some_identify_later(normal: Stream) -> None:
    anonymous_only = [e for _, e in normal if "customer_id" not in e]
    assert 0.1 < len(anonymous_only) / len(normal) < 0.4
    assert all(e["anonymous_id"].startswith("anon-") for e in anonymous_only)
    assert {e["channel"] for e in anonymous_only} >= {"web", "app"}

    identifies = [e for _, e in normal if e["event_type"] == "identify"]
    assert {e["properties"]["method"] for e in identifies} == {
        "login",
        "signup",
        "checkout",
        "loyalty_card",
    }
    first_identify: dict[str, int] = {}
    for e in identifies:
        first_identify.setdefault(e["anonymous_id"], event_time_ms(e))
    # Devices seen anonymously and linked to a customer later: identity stitching material.
    stitched = {
        e["anonymous_id"]
        for e in anonymous_only
        if event_time_ms(e) < first_identify.get(e["anonymous_id"], 0)
    }
    assert len(stitched) > 500
    # ...and visitors who never say who they are.
    anonymous_ids = {e["anonymous_id"] for e in anonymous_only}
    assert len(anonymous_ids - first_identify.keys()) > len(anonymous_ids) / 3
    # After identify the customer id travels along with the device id on web/app.
    after = [
        e
        for _, e in normal
        if e.get("anonymous_id") in first_identify
        and event_time_ms(e) > first_identify[e["anonymous_id"]]
        and e["channel"] in ("web", "app")
        and e["event_type"] != "identify"
    ]
    assert after and sum("customer_id" in e for e in after) / len(after) > 0.5
    customers = {e["customer_id"] for _, e in normal if "customer_id" in e}
    assert all(re.fullmatch(r"cust-\d{6}", c) for c in customers)


def test_no_anonymous_events_when_anonymous_share_is_zero() -> None:
    events = Simulator(seed=2, start_ms=START, rate=RATE, anonymous_share=0.0).take(20_000)
    assert all("customer_id" in e for _, e in events)
    assert not any(e["event_type"] == "identify" for _, e in events)


def test_small_population_keeps_coming_back() -> None:
    events = Simulator(seed=4, start_ms=START, rate=RATE, customers=50).take(20_000)
    customers = collections.Counter(e["customer_id"] for _, e in events if "customer_id" in e)
    known = {f"cust-{n:06d}" for n in range(50)}
    assert known <= customers.keys()  # everyone returns, again and again
    assert all(c in known or int(c[5:]) > 50 for c in customers)  # or signed up as new


def test_customers_come_back_over_days() -> None:
    # Three days of a quiet shop with a large population: returns are follow-ups, not chance.
    sim = Simulator(seed=6, start_ms=START, rate=0.5, customers=1_000_000)
    days: dict[str, set[int]] = collections.defaultdict(set)
    support: dict[str, list[int]] = collections.defaultdict(list)
    for _, e in sim.until(START + 3 * 86_400_000):
        if "customer_id" in e:
            days[e["customer_id"]].add((event_time_ms(e) - START) // 86_400_000)
            if e["event_type"] == "support_contact":
                support[e["customer_id"]].append(event_time_ms(e))
    assert sum(len(d) >= 2 for d in days.values()) > 200
    repeated = [c for c, times in support.items() if len(times) >= 3]
    assert 5 <= len(repeated) < 0.1 * len(support)  # a few, not everyone


# --- Normal-day behaviour ---------------------------------------------------------------------


def payment_attempts(events: Iterable[dict[str, Any]]) -> tuple[int, int]:
    """(failed, succeeded) online payment attempts."""
    events = list(events)
    online = [e for e in events if e["channel"] in ("web", "app")]
    return count(online, "payment_failed"), count(online, "purchase")


def test_about_one_cart_in_five_is_abandoned(normal: Stream) -> None:
    started: dict[str, float] = {}
    bought: set[str] = set()
    for _, e in normal:
        cart = e["properties"].get("cart_id")
        if e["event_type"] == "cart_add":
            started.setdefault(cart, seconds(e))
        elif e["event_type"] == "purchase":
            bought.add(cart)
    # Carts started early enough to have been checked out by the end of the run.
    carts = [cart for cart, at in started.items() if at < RUN_S / 2]
    assert len(carts) > 500
    assert 0.12 < sum(cart not in bought for cart in carts) / len(carts) < 0.3


def test_baseline_payment_failures_are_rare(normal: Stream) -> None:
    failed, succeeded = payment_attempts(e for _, e in normal)
    assert 0.005 < failed / (failed + succeeded) < 0.05
    reasons = {e["properties"]["reason"] for _, e in normal if e["event_type"] == "payment_failed"}
    assert len(reasons) >= 3


def test_surveys_are_mostly_good(normal: Stream) -> None:
    surveys = [e["properties"] for _, e in normal if e["event_type"] == "survey_response"]
    assert {s["survey"] for s in surveys} == {"nps", "csat", "ces"}
    nps = [s["score"] for s in surveys if s["survey"] == "nps"]
    csat = [s["score"] for s in surveys if s["survey"] == "csat"]
    assert sum(score >= 9 for score in nps) > 2 * sum(score <= 6 for score in nps)
    assert sum(score >= 4 for score in csat) > 0.6 * len(csat)


# --- Incidents --------------------------------------------------------------------------------


def test_payment_outage_fails_payments_and_drives_customers_to_support(
    normal: Stream, outage: Stream
) -> None:
    # The outage plus a few minutes for the support queue and the surveys to follow.
    span = INCIDENT_AT, INCIDENT_AT + INCIDENT_FOR + 180
    calm, storm = window(normal, *span), window(outage, *span)

    calm_failed, calm_ok = payment_attempts(calm)
    storm_failed, storm_ok = payment_attempts(storm)
    assert calm_failed / (calm_failed + calm_ok) < 0.05
    assert storm_failed / (storm_failed + storm_ok) > 0.35
    assert storm_ok < 0.85 * calm_ok  # fewer purchases: abandoned after a retry or two
    reasons = collections.Counter(
        e["properties"]["reason"] for e in storm if e["event_type"] == "payment_failed"
    )
    assert reasons["gateway_error"] + reasons["timeout"] > 0.9 * sum(reasons.values())

    calm_support = count(calm, "support_contact", topic="payment")
    storm_support = count(storm, "support_contact", topic="payment")
    assert storm_support > 2.5 * calm_support

    def detractor_share(events: list[dict[str, Any]]) -> float:
        surveys = [e["properties"] for e in events if e["event_type"] == "survey_response"]
        bad = sum(
            (s["survey"] == "nps" and s["score"] <= 6)
            or (s["survey"] == "csat" and s["score"] <= 2)
            or (s["survey"] == "ces" and s["score"] >= 5)
            for s in surveys
        )
        return bad / len(surveys)

    assert detractor_share(storm) > 2 * detractor_share(calm)

    # Before the outage both runs are the same events (a script decides a payment's fate
    # when it schedules the attempt, up to two minutes ahead, so stop short of that).
    before = INCIDENT_AT - 120
    assert jsonio.dumps(window(normal, 0, before)) == jsonio.dumps(window(outage, 0, before))


def test_payment_outage_is_bounded_in_time(outage: Stream) -> None:
    late = window(outage, INCIDENT_AT + INCIDENT_FOR + 60, RUN_S)
    failed, succeeded = payment_attempts(late)
    assert failed / (failed + succeeded) < 0.05


def test_app_errors_repeat_the_same_error_within_a_minute(
    normal: Stream, app_errors: Stream
) -> None:
    span = INCIDENT_AT, INCIDENT_AT + INCIDENT_FOR

    def error_loops(events: list[dict[str, Any]]) -> int:
        """Visitors with the same error code three times within 60 s."""
        seen: dict[tuple[str, str], list[float]] = collections.defaultdict(list)
        for e in events:
            if e["event_type"] == "error":
                who = e.get("customer_id") or e["anonymous_id"]
                seen[who, e["properties"]["error_code"]].append(seconds(e))
        return sum(any(ts[i + 2] - ts[i] <= 60 for i in range(len(ts) - 2)) for ts in seen.values())

    calm, storm = window(normal, *span), window(app_errors, *span)
    assert count(storm, "error") > 10 * count(calm, "error")
    assert {e["channel"] for e in storm if e["event_type"] == "error"} >= {"app"}
    assert error_loops(storm) > 500
    assert error_loops(calm) < 10


# --- Incident syntax --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("payment_outage@60+120", Incident("payment_outage", 60.0, 120.0)),
        ("app_errors@0+30.5", Incident("app_errors", 0.0, 30.5)),
        (" payment_outage @ 1.5 + 2 ", Incident("payment_outage", 1.5, 2.0)),
    ],
)
def test_incident_parse(text: str, expected: Incident) -> None:
    assert Incident.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected KIND@START\\+DURATION"),
        ("payment_outage", "expected KIND@START\\+DURATION"),
        ("payment_outage@60", "expected KIND@START\\+DURATION"),
        ("payment_outage@-5+10", "expected KIND@START\\+DURATION"),
        ("payment_outage@x+10", "expected KIND@START\\+DURATION"),
        ("payment_outage@60+0", "duration must be"),
        ("meteor_strike@60+10", "unknown incident kind 'meteor_strike'"),
    ],
)
def test_incident_parse_rejects_bad_text(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Incident.parse(text)


@given(
    kind=st.sampled_from(INCIDENT_KINDS),
    start=st.integers(min_value=0, max_value=10**7),
    duration=st.integers(min_value=1, max_value=10**7),
)
def test_incident_parse_round_trips(kind: str, start: int, duration: int) -> None:
    incident = Incident.parse(f"{kind}@{start}+{duration}")
    assert incident == Incident(kind, start, duration)
    assert incident.active(start) and not incident.active(start + duration)


@pytest.mark.parametrize(
    "kwargs",
    [{"rate": 0.0}, {"rate": float("nan")}, {"customers": 0}, {"anonymous_share": 1.5}],
)
def test_simulator_rejects_bad_arguments(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        Simulator(start_ms=START, **kwargs)


# --- Any configuration ------------------------------------------------------------------------


@settings(max_examples=20, deadline=None)
@given(
    seed=st.integers(min_value=0, max_value=2**32),
    rate=st.floats(min_value=0.5, max_value=400),
    customers=st.integers(min_value=1, max_value=10**6),
    anonymous_share=st.floats(min_value=0, max_value=1),
    incidents=st.lists(
        st.builds(
            Incident,
            kind=st.sampled_from(INCIDENT_KINDS),
            start_s=st.floats(min_value=0, max_value=20),
            duration_s=st.floats(min_value=0.1, max_value=100),
        ),
        max_size=2,
    ),
)
def test_any_configuration_gives_valid_ordered_unique_events(
    seed: int,
    rate: float,
    customers: int,
    anonymous_share: float,
    incidents: list[Incident],
) -> None:
    sim = Simulator(
        seed=seed,
        start_ms=START,
        rate=rate,
        customers=customers,
        incidents=incidents,
        anonymous_share=anonymous_share,
    )
    events = sim.take(600)
    times = [event_time_ms(e) for _, e in events]
    assert times == sorted(times) and times[0] >= START
    assert len({e["event_id"] for _, e in events}) == len(events)
    for _, event in events:
        assert not isinstance(DECODER.validate(jsonio.dumps(event)), Rejection), event
