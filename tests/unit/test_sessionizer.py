"""The sessionizer core, without Kafka: examples and Hypothesis properties."""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from streams.bundles import Event, Merge, Touchpoint
from streams.core.journey import CustomerState, decode_state, encode_state
from streams.core.sessionizer import MINUTE, Effects, SessionConfig, Sessionizer
from streams.core.stages import stage_of

T0 = 1_793_607_300_000
END = T0 + 10**12


def tp(
    eid: str,
    ts: int,
    key: str = "c1",
    etype: str = "page_view",
    channel: str = "web",
    anonymous: bool = False,
    **props: Any,
) -> Touchpoint:
    props = props or ({"url": "/p/1"} if etype == "page_view" else {})
    event = Event(
        eid, etype, channel, props,
        customer_id=None if anonymous else key, anonymous_id=key if anonymous else None,
    )  # fmt: skip
    return Touchpoint(ts, key, stage_of(etype, props), event)


class Driver:
    """Feeds events like one partition does: stream time = max event time seen."""

    def __init__(self, config: SessionConfig | None = None) -> None:
        self.s = Sessionizer(config)
        self.states: dict[str, CustomerState] = {}
        self.now = 0
        self.closed: list[dict[str, Any]] = []
        self.late: list[Touchpoint] = []
        self.forwards: list[tuple[str, Any]] = []
        self.duplicates = 0

    def state(self, key: str) -> CustomerState:
        return self.states.setdefault(key, CustomerState(key))

    def _collect(self, fx: Effects) -> None:
        self.closed += fx.closed
        self.late += [le.touchpoint for le in fx.late]
        self.forwards += fx.forwards
        self.duplicates += fx.duplicates

    def feed(self, *events: Touchpoint) -> None:
        for event in events:
            self.now = max(self.now, event.ts)
            fx = Effects()
            self.s.apply(self.state(event.key), event, self.now, fx)
            self._collect(fx)

    def advance(self, now: int) -> None:
        self.now = max(self.now, now)
        for state in self.states.values():
            fx = Effects()
            self.s.close_due(state, self.now, fx)
            self._collect(fx)

    def finish(self) -> None:
        self.advance(END)


def ids(summary: dict[str, Any]) -> list[str]:
    return [t["event_id"] for t in summary["touchpoints"]]


# ------------------------------------------------------------------ examples
def test_gap_splits_journeys_and_closing_waits_for_gap_plus_grace() -> None:
    d = Driver(SessionConfig(gap_ms=30 * MINUTE, grace_ms=5 * MINUTE))
    d.feed(tp("a", T0), tp("b", T0 + 10 * MINUTE), tp("c", T0 + 41 * MINUTE))
    assert d.closed == []  # first journey's deadline: b + 30 + 5 min = T0 + 45 min
    d.advance(T0 + 45 * MINUTE)
    (first,) = d.closed
    assert ids(first) == ["a", "b"]
    assert first["close_reason"] == "inactivity"
    assert first["closed_at"] == "2026-11-02T08:60:00.000Z".replace("08:60", "09:00")
    d.finish()
    assert [ids(j) for j in d.closed] == [["a", "b"], ["c"]]


def test_out_of_order_within_grace_is_placed_in_order_and_late_goes_aside() -> None:
    d = Driver(SessionConfig(grace_ms=5 * MINUTE))
    d.feed(tp("a", T0), tp("c", T0 + 10 * MINUTE), tp("b", T0 + 6 * MINUTE))
    d.feed(tp("x", T0 + 20 * MINUTE), tp("old", T0 + 14 * MINUTE))
    d.finish()
    (journey,) = d.closed
    assert ids(journey) == ["a", "b", "c", "x"]
    assert [t.event.event_id for t in d.late] == ["old"]
    assert journey["late_events"] == 1


def test_bridging_event_merges_two_journeys() -> None:
    d = Driver(SessionConfig(gap_ms=30 * MINUTE, grace_ms=60 * MINUTE))
    d.feed(tp("a", T0), tp("c", T0 + 50 * MINUTE))
    d.feed(tp("b", T0 + 25 * MINUTE))
    d.finish()
    assert [ids(j) for j in d.closed] == [["a", "b", "c"]]


def test_max_duration_starts_a_continuation() -> None:
    d = Driver(SessionConfig(gap_ms=30 * MINUTE, max_duration_ms=60 * MINUTE, grace_ms=0))
    d.feed(*[tp(f"e{i}", T0 + i * 10 * MINUTE) for i in range(10)])
    d.finish()
    assert [ids(j) for j in d.closed] == [
        ["e0", "e1", "e2", "e3", "e4", "e5"], ["e6", "e7", "e8", "e9"],
    ]  # fmt: skip
    assert [j["close_reason"] for j in d.closed] == ["max_duration", "inactivity"]


def test_per_channel_gap() -> None:
    d = Driver(SessionConfig(gap_ms=30 * MINUTE, channel_gap_ms={"store": 120 * MINUTE}))
    d.feed(
        tp("visit", T0, etype="store_visit", channel="store", store_id="s1"),
        tp("after", T0 + 90 * MINUTE),
        tp("later", T0 + 125 * MINUTE),
    )
    d.finish()
    assert [ids(j) for j in d.closed] == [["visit", "after"], ["later"]]


def test_duplicates_are_counted_once() -> None:
    d = Driver()
    d.feed(tp("a", T0), tp("a", T0), tp("b", T0 + 1), tp("a", T0 + 2))
    d.finish()
    (journey,) = d.closed
    assert ids(journey) == ["a", "b"] and journey["touchpoint_count"] == 2
    assert journey["duplicates"] == 2 and d.duplicates == 2


def test_history_is_bounded_but_totals_are_kept() -> None:
    d = Driver(SessionConfig(max_touchpoints=5))
    d.feed(*[tp(f"e{i:02d}", T0 + i * 1000) for i in range(12)])
    d.finish()
    (journey,) = d.closed
    assert journey["touchpoint_count"] == 12
    assert ids(journey) == ["e07", "e08", "e09", "e10", "e11"]


def test_stages_cart_and_outcomes() -> None:
    d = Driver()
    d.feed(
        tp("ad", T0, etype="ad_click", channel="ads", campaign_id="x"),
        tp("pv", T0 + 1000, etype="product_view", product_id="p"),
        tp("add", T0 + 2000, etype="cart_add", cart_id="c", product_id="p", price=10.0, quantity=2),
        tp("co", T0 + 3000, etype="checkout_start", cart_id="c", currency="EUR"),
        tp("pf", T0 + 4000, etype="payment_failed", reason="timeout"),
    )
    d.feed(tp("b-pv", T0, key="c2"), tp("b-pv2", T0 + 1000, key="c2", url="/products/2"))
    d.feed(
        tp(
            "s1",
            T0,
            key="c3",
            etype="support_contact",
            channel="support",
            medium="call",
            topic="payment",
        ),
        tp(
            "s2",
            T0 + 1,
            key="c3",
            etype="survey_response",
            channel="support",
            survey="csat",
            score=1,
        ),
    )
    d.feed(
        tp("add4", T0, key="c4", etype="cart_add", cart_id="c", product_id="p", price=5.0),
        tp("buy4", T0 + 10, key="c4", etype="purchase", order_id="o", value=5.0, currency="EUR"),
        tp(
            "nps4",
            T0 + 20,
            key="c4",
            etype="survey_response",
            channel="email",
            survey="nps",
            score=10,
        ),
    )
    d.finish()
    by_key = {j["customer_id"]: j for j in d.closed}
    c1 = by_key["c1"]
    assert c1["outcome"] == "abandoned_cart"
    assert c1["cart"] == {"status": "abandoned", "items": 2, "value": 20.0, "currency": "EUR"}
    assert (c1["stage_first"], c1["stage_current"], c1["stage_furthest"]) == (
        "awareness", "purchase", "purchase",
    )  # fmt: skip
    assert c1["channels"] == ["ads", "web"]
    assert by_key["c2"]["outcome"] == "browse_only"
    assert by_key["c3"]["outcome"] == "support_only"
    assert by_key["c3"]["surveys"] == [{"survey": "csat", "score": 1, "channel": "support"}]
    c4 = by_key["c4"]
    assert c4["outcome"] == "converted" and c4["orders"] == {"count": 1, "revenue": 5.0}
    assert c4["cart"]["status"] == "purchased"
    assert c4["stage_furthest"] == "advocacy" and c4["stage_current"] == "advocacy"


def test_identify_hands_anonymous_journey_to_the_customer() -> None:
    d = Driver()
    d.feed(
        tp("a1", T0, key="anon-1", anonymous=True),
        tp("a2", T0 + 1000, key="anon-1", anonymous=True),
    )
    d.feed(tp("c1", T0 + 2000, key="cust-1"))
    fx = Effects()
    d.s.link(d.state("anon-1"), "cust-1", "ident-1", T0 + 2000, fx)
    ((target, merge),) = fx.forwards
    assert target == "cust-1" and isinstance(merge, Merge)
    fx2 = Effects()
    d.s.merge(d.state("cust-1"), merge, d.now, fx2)
    d.s.merge(d.state("cust-1"), merge, d.now, fx2)  # a replayed hand-over is ignored
    # Later anonymous-only events of the identified visitor are forwarded.
    d.feed(tp("a3", T0 + 3000, key="anon-1", anonymous=True))
    ((target2, forwarded),) = d.forwards
    assert target2 == "cust-1" and forwarded.key == "cust-1"
    assert forwarded.event.customer_id == "cust-1" and forwarded.event.anonymous_id == "anon-1"
    d.feed(forwarded)
    d.finish()
    (journey,) = d.closed
    assert journey["customer_id"] == "cust-1"
    assert ids(journey) == ["a1", "a2", "c1", "a3"]
    assert journey["anonymous_ids"] == ["anon-1"] and journey["identified"] is True
    assert journey["touchpoint_count"] == 4
    assert d.state("cust-1").anonymous_ids == ["anon-1"]


def test_live_state_of_twenty_touchpoints_is_under_2_kib() -> None:
    d = Driver()
    kinds = ["page_view", "product_view", "cart_add", "email_open", "support_contact"]
    for i in range(20):
        etype = kinds[i % len(kinds)]
        props = {
            "page_view": {"url": "/products/12345"},
            "product_view": {"product_id": "SKU-12345"},
            "cart_add": {"cart_id": "cart-1", "product_id": "SKU-1", "price": 9.5},
            "email_open": {"campaign_id": "cmp"},
            "support_contact": {"medium": "chat", "topic": "delivery"},
        }[etype]
        d.feed(
            tp(
                f"0a4c8e2f-7f1e-4a8b-9d7c-{i:012d}",
                T0 + i * 1000,
                key="cust-000123",
                etype=etype,
                **props,
            )
        )
    data = encode_state(d.state("cust-000123"))
    assert len(data) <= 2048, len(data)
    assert decode_state(data) == d.state("cust-000123")


# ------------------------------------------------------------------ properties
GAP = 30 * MINUTE
GRACE = 5 * MINUTE


def _timeline(steps: list[tuple[str, int, str]]) -> list[tuple[str, int, str]]:
    """Steps of (key, seconds since the previous event, channel) -> absolute event times.

    Steps of up to 50 minutes put many neighbours close to the 30-minute gap.
    """
    out, ts = [], T0
    for key, delta, channel in steps:
        ts += delta * 1000
        out.append((key, ts, channel))
    return out


event_lists = st.lists(
    st.tuples(
        st.sampled_from(["c1", "c2", "c3"]),
        st.integers(min_value=0, max_value=50 * 60),
        st.sampled_from(["web", "app", "email"]),
    ),
    min_size=1,
    max_size=60,
).map(_timeline)


def _events(raw: list[tuple[str, int, str]]) -> list[Touchpoint]:
    return [tp(f"e{i}", ts, key=key, channel=ch, etype="search" if ch != "web" else "page_view", query="q")
            if ch != "web" else tp(f"e{i}", ts, key=key)
            for i, (key, ts, ch) in enumerate(raw)]  # fmt: skip


def _run(events: list[Touchpoint], config: SessionConfig) -> Driver:
    d = Driver(config)
    d.feed(*events)
    d.finish()
    return d


def _shape(d: Driver) -> set[tuple[Any, ...]]:
    return {
        (j["customer_id"], tuple(sorted(ids(j))), j["touchpoint_count"], j["outcome"],
         j["stage_first"], j["stage_current"], j["stage_furthest"], tuple(j["channels"]))
        for j in d.closed
    }  # fmt: skip


CONFIG = SessionConfig(gap_ms=GAP, grace_ms=GRACE, max_touchpoints=1000, max_duration_ms=10**12)


@settings(max_examples=300, deadline=None)
@given(event_lists, st.randoms(use_true_random=False))
def test_every_event_lands_in_exactly_one_journey_or_the_late_topic(
    raw, rnd: random.Random
) -> None:
    events = _events(raw)
    rnd.shuffle(events)  # any arrival order at all, late events included
    d = _run(events, CONFIG)
    placed = Counter(eid for j in d.closed for eid in ids(j)) + Counter(
        t.event.event_id for t in d.late
    )
    assert placed == Counter(e.event.event_id for e in events)
    assert sum(j["touchpoint_count"] for j in d.closed) + len(d.late) == len(events)


# A grace longer than the gap lets events arrive after ones a full gap later,
# so bridging (merging two journeys) is exercised too.
LONG_GRACE = SessionConfig(
    gap_ms=GAP, grace_ms=3 * GAP, max_touchpoints=1000, max_duration_ms=10**12
)


@settings(max_examples=400, deadline=None)
@given(
    event_lists,
    st.lists(st.floats(min_value=0, max_value=0.999), min_size=60, max_size=60),
    st.sampled_from([CONFIG, LONG_GRACE]),
)
def test_arrival_order_within_grace_does_not_change_the_result(raw, delays, config) -> None:
    events = _events(raw)
    in_order = sorted(events, key=lambda e: (e.ts, e.event.event_id))
    # Each event arrives by ts + a delay below the grace: nothing is late.
    jittered = sorted(
        events, key=lambda e: e.ts + delays[int(e.event.event_id[1:])] * config.grace_ms
    )
    a, b = _run(in_order, config), _run(jittered, config)
    assert a.late == [] and b.late == []
    assert _shape(a) == _shape(b)


@settings(max_examples=300, deadline=None)
@given(event_lists, st.randoms(use_true_random=False))
def test_journeys_never_overlap_and_respect_the_gap(raw, rnd: random.Random) -> None:
    events = _events(raw)
    rnd.shuffle(events)
    d = _run(events, CONFIG)
    per_key: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for journey in d.closed:
        per_key[journey["customer_id"]].append(journey)
        times = [e.ts for e in events if e.event.event_id in set(ids(journey))]
        times.sort()
        assert all(b - a <= GAP for a, b in itertools.pairwise(times))
    by_id = {e.event.event_id: e.ts for e in events}
    for journeys in per_key.values():
        spans = sorted(
            (min(by_id[i] for i in ids(j)), max(by_id[i] for i in ids(j))) for j in journeys
        )
        for (_s1, e1), (s2, _e2) in itertools.pairwise(spans):
            assert s2 > e1, "journeys overlap"
            assert s2 - e1 > GAP


@settings(max_examples=200, deadline=None)
@given(event_lists, st.lists(st.integers(min_value=0, max_value=59), max_size=20))
def test_redelivered_events_are_never_counted_twice(raw, repeats) -> None:
    events = sorted(_events(raw), key=lambda e: e.ts)
    stream = list(events)
    for r in repeats:
        if r < len(events):
            stream.insert(min(len(stream), r + 1 + r % 3), events[r])  # redelivered soon after
    d = _run(stream, CONFIG)
    counted = Counter(eid for j in d.closed for eid in ids(j)) + Counter(
        t.event.event_id for t in d.late
    )
    assert counted == Counter(e.event.event_id for e in events)


def test_an_alias_first_seen_in_its_identify_event_outlives_the_link() -> None:
    sessionizer = Sessionizer(SessionConfig())
    alias = CustomerState("anon-1")
    t = 1_793_607_300_000
    sessionizer.link(alias, "cust-1", "identify-1", t, Effects())
    assert alias.alias_of == "cust-1"
    assert not sessionizer.expired(alias, t + MINUTE)  # kept to stitch later anonymous events
    assert sessionizer.next_deadline(alias) == t + SessionConfig().expire_ms
