"""Friction rules without Kafka: config errors, the three kinds, stable ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from streams.core.rules import RuleEngine, load_rules, parse_duration
from streams.core.sessionizer import MINUTE, SessionConfig, Sessionizer
from tests.reference import assert_valid_record
from tests.unit.test_sessionizer import T0, Driver, tp
from touchpoint.errors import ConfigError

HOUR = 60 * MINUTE
DAY = 24 * HOUR


def driver(rules_path: str | None = None, **config: Any) -> Driver:
    d = Driver(SessionConfig(**config))
    d.s = Sessionizer(d.s.config, RuleEngine(load_rules(rules_path)))
    d.signals: list[dict[str, Any]] = []  # type: ignore[misc]
    collect = d._collect

    def collect_all(fx: Any) -> None:
        collect(fx)
        d.signals += [record for _at, record in fx.signals]

    d._collect = collect_all  # type: ignore[method-assign]
    return d


def rules_of(d: Driver) -> list[str]:
    return [s["rule"] for s in d.signals]


# ------------------------------------------------------------------ config
def test_the_default_rules_load() -> None:
    config = load_rules()
    assert {r.name for r in config.rules} >= {
        "cart_abandonment", "repeated_support_contact", "payment_failure",
        "detractor_feedback", "error_loop", "email_friction",
    }  # fmt: skip
    assert config.spikes.window_ms == MINUTE


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[rule]]\nname = "x"\nkind = "magic"\n', "kind"),
        ('[[rule]]\nname = "x"\nkind = "match"\nwhen = {event_type = "a"}\ncolour = 1\n', "unknown keys"),
        ('[[rule]]\nname = "x"\nkind = "threshold"\nwhen = {event_type = "a"}\ncount = 3\nwithin = "soon"\n', "duration"),
        ('[[rule]]\nname = "x"\nkind = "match"\nwhen = {"properties.s" = {approx = 1}}\n', "operator"),
        ('[[rule]]\nname = "x"\nkind = "match"\nwhen = {colour = "red"}\n', "unknown field"),
        ('[[rule]]\nname = "Bad Name"\nkind = "match"\nwhen = {event_type = "a"}\n', "name"),
        ('[[rule]]\nname = "x"\nkind = "absence"\nstart = {event_type = "a"}\n', "needs"),
        ('[[rule]]\nname = "x"\nkind = "match"\nwhen = {event_type = "a"}\n[[rule]]\nname = "x"\nkind = "match"\nwhen = {event_type = "b"}\n', "duplicate"),
        ('[[rule]]\nname = "x"\nkind = "absence"\nstart = {event_type = "a"}\nend = {event_type = "b"}\nwithin = "1h"\ncorrelate = 5\n', "must be a string"),
        ('[[rule]]\nname = "x"\nkind = "absence"\nstart = {event_type = "a"}\nend = {event_type = "b"}\nwithin = "1h"\ncorrelate = ""\n', "unknown field"),
        ('[[rule]]\nname = "x"\nkind = "threshold"\nwhen = {event_type = "a"}\ncount = 3\nwithin = "1h"\ngroup_by = [5]\n', "must be a string"),
        ('[spikes]\nalpha = 3\n', "alpha"),
        ("[[rule]\n", "Expected"),
    ],
)  # fmt: skip
def test_config_errors_are_reported_with_the_rule_named(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "rules.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_rules(path)
    assert str(path) in str(info.value)


def test_durations() -> None:
    assert parse_duration("90s", "x") == 90_000
    assert parse_duration("1.5h", "x") == 90 * MINUTE
    assert parse_duration("7d", "x") == 7 * DAY


# ------------------------------------------------------------------ match
def test_match_rules_raise_one_signal_per_event() -> None:
    d = driver()
    d.feed(
        tp("pf", T0, etype="payment_failed", reason="timeout"),
        tp("e1", T0 + 1, etype="error", error_code="PAYMENT_TIMEOUT", page="/pay"),
        tp("e2", T0 + 2, etype="error", error_code="E500", page="/checkout/step2"),
        tp("e3", T0 + 3, etype="error", error_code="E404", page="/blog"),
        tp("n1", T0 + 4, etype="survey_response", channel="email", survey="nps", score=6),
        tp("n2", T0 + 5, etype="survey_response", channel="email", survey="nps", score=7),
        tp("c1", T0 + 6, etype="survey_response", channel="email", survey="csat", score=2),
        tp("x1", T0 + 7, etype="survey_response", channel="email", survey="ces", score=5),
        tp(
            "b1", T0 + 8, etype="email_bounce", channel="email", campaign_id="c", bounce_type="hard"
        ),
    )
    assert rules_of(d) == [
        "payment_failure", "payment_failure", "payment_failure",
        "detractor_feedback", "detractor_feedback", "detractor_feedback", "email_friction",
    ]  # fmt: skip
    for signal in d.signals:
        assert_valid_record(signal)
    assert d.signals[0]["evidence"] == ["pf"] and d.signals[0]["severity"] == "high"
    d.finish()
    (journey,) = d.closed
    assert [f["rule"] for f in journey["friction"]][:3] == ["payment_failure"] * 3


# ------------------------------------------------------------------ threshold
def test_repeated_support_contact_counts_across_journeys_within_seven_days() -> None:
    d = driver()

    def contact(eid: str, ts: int) -> Any:
        return tp(
            eid, ts, etype="support_contact", channel="support", medium="call", topic="delivery"
        )

    d.feed(contact("s1", T0), contact("s2", T0 + 2 * DAY))
    assert rules_of(d) == []
    d.feed(contact("s3", T0 + 6 * DAY))
    assert rules_of(d) == ["repeated_support_contact"]
    assert d.signals[0]["evidence"] == ["s1", "s2", "s3"]
    d.feed(contact("s4", T0 + 6 * DAY + HOUR))  # counting starts again
    assert len(d.signals) == 1
    d.feed(contact("s5", T0 + 14 * DAY), contact("s6", T0 + 20 * DAY))
    assert len(d.signals) == 1  # s4, s5, s6 are not within 7 days of each other


def test_error_loop_needs_the_same_error_three_times_within_a_minute() -> None:
    d = driver()

    def err(eid: str, ts: int, code: str = "E500") -> Any:
        return tp(eid, ts, etype="error", error_code=code, page="/p")

    d.feed(
        err("a", T0), err("b", T0 + 20_000, "E404"), err("c", T0 + 30_000), err("d", T0 + 70_000)
    )
    assert rules_of(d) == []  # a, c, d: E500 three times, but over 70 s
    d.feed(err("e", T0 + 80_000))  # c, d, e: within 50 s
    assert rules_of(d) == ["error_loop"]
    assert d.signals[0]["evidence"] == ["c", "d", "e"]
    assert d.signals[0]["details"]["group"] == "error/E500"
    d.feed(err("f", T0 + 90_000))  # counting started again after the signal
    assert rules_of(d) == ["error_loop"]


def test_threshold_history_of_other_groups_is_dropped_once_no_event_can_use_it() -> None:
    """A page view per url, 2 min apart, in one open journey: the error loop keeps
    only the groups that an event within the grace could still count with."""
    d = driver()
    grace = d.s.config.grace_ms
    for i in range(20):
        d.feed(tp(f"v{i}", T0 + i * 2 * MINUTE, url=f"/p/{i}"))
    groups = d.state("c1").rules["error_loop"]
    window = MINUTE + grace  # the rule's window plus the grace
    newest = T0 + 19 * 2 * MINUTE
    assert groups, "the newest page view is counted"
    assert all(entries[-1][0] >= newest - window for entries in groups.values())
    assert len(groups) <= window // (2 * MINUTE) + 1
    assert len(d.state("c1").journeys) == 1  # still one journey: only the rule history shrank


def test_a_group_kept_within_the_grace_still_counts_an_out_of_order_event() -> None:
    d = driver()
    d.feed(tp("a", T0, url="/x"), tp("b", T0 + 10_000, url="/x"))
    d.feed(tp("c", T0 + 3 * MINUTE, url="/y"))  # /x is 3 min old: within window + grace
    d.feed(tp("d", T0 + 20_000, url="/x"))  # out of order, not late (grace 5 min)
    assert rules_of(d) == ["error_loop"]
    assert d.signals[0]["evidence"] == ["a", "b", "d"]


# ------------------------------------------------------------------ absence
def cart(eid: str, ts: int, cart_id: str = "cart-1") -> Any:
    return tp(eid, ts, etype="cart_add", cart_id=cart_id, product_id="p", price=5.0)


def test_cart_abandonment_fires_at_the_deadline_while_the_customer_is_silent() -> None:
    d = driver(gap_ms=2 * HOUR)  # journey stays open: the 1 h deadline comes first
    d.feed(cart("add", T0))
    d.advance(T0 + HOUR - 1)
    assert rules_of(d) == []
    d.advance(T0 + HOUR)  # stream time passes the deadline; no event from this customer
    assert rules_of(d) == ["cart_abandonment"]
    signal = d.signals[0]
    assert signal["occurred_at"] == "2026-11-02T09:15:00.000Z" and signal["evidence"] == ["add"]
    assert signal["details"]["correlation"] == "cart-1" and signal["journey_id"]
    assert_valid_record(signal)


def test_cart_abandonment_fires_when_the_journey_closes_first() -> None:
    d = driver(gap_ms=30 * MINUTE, grace_ms=5 * MINUTE)
    d.feed(cart("add", T0))
    d.advance(T0 + 35 * MINUTE)  # journey closes (gap + grace) before the 1 h deadline
    assert rules_of(d) == ["cart_abandonment"]
    assert d.signals[0]["occurred_at"] == "2026-11-02T08:50:00.000Z"
    (journey,) = d.closed
    assert journey["friction"] == [
        {"signal_id": d.signals[0]["signal_id"], "rule": "cart_abandonment"}
    ]
    assert journey["outcome"] == "abandoned_cart"


def test_a_purchase_ends_the_wait_and_each_cart_signals_once() -> None:
    d = driver(gap_ms=3 * HOUR)
    d.feed(
        cart("add-1", T0),
        tp(
            "buy",
            T0 + 10 * MINUTE,
            etype="purchase",
            order_id="o",
            value=5.0,
            currency="EUR",
            cart_id="cart-1",
        ),
        cart("add-2", T0 + 20 * MINUTE, "cart-2"),
        cart("add-2b", T0 + 21 * MINUTE, "cart-2"),  # same cart: no second expectation
    )
    d.advance(T0 + 2 * HOUR)
    assert rules_of(d) == ["cart_abandonment"]
    assert d.signals[0]["evidence"] == ["add-2"]
    d.feed(cart("add-2c", T0 + 2 * HOUR + 1, "cart-2"))  # already signalled for cart-2
    d.advance(T0 + 4 * HOUR)
    assert rules_of(d) == ["cart_abandonment"]


def test_signal_ids_are_stable_on_replay() -> None:
    def run() -> list[str]:
        d = driver()
        d.feed(cart("add", T0), tp("pf", T0 + 1, etype="payment_failed", reason="timeout"))
        d.finish()
        return [s["signal_id"] for s in d.signals]

    first = run()
    assert len(first) == 2 and first == run()


def test_matchers_specialised_per_event_type_agree_with_the_full_predicate() -> None:
    """The engine settles event-type conditions once per type; the verdicts must not change."""
    import itertools

    from streams.bundles import properties_of
    from streams.core.rules import compile_matcher

    specs: list[Any] = [
        {"event_type": "support_contact"},
        {"event_type": ["error", "page_view"]},
        {"event_type": {"in": ["error", "purchase"]}, "channel": "web"},
        {"event_type": {"eq": "error", "in": ["error", "page_view"]}},
        {"event_type": {"ne": "error"}, "properties.url": {"prefix": "/checkout"}},
        {"channel": ["app", "web"]},
        {"properties.score": {"le": 6}, "event_type": "survey_response"},
        [
            {"event_type": "payment_failed"},
            {"event_type": "error", "properties.page": {"prefix": "/checkout"}},
            {"event_type": "error", "properties.error_code": {"prefix": "PAYMENT"}},
        ],
        [{"event_type": "error"}, {"channel": "store"}],
    ]
    for rule in load_rules(None).rules:
        specs += [m for _role, m in rule.matchers()]
    types = ["page_view", "error", "purchase", "support_contact", "payment_failed",
             "survey_response", "email_bounce"]  # fmt: skip
    prop_sets: list[dict[str, Any]] = [
        {},
        {"url": "/checkout/pay", "page": "/checkout", "error_code": "PAYMENT_DECLINED"},
        {"url": "/home", "error_code": "E1", "score": 3},
        {"score": 9, "survey": "nps"},
    ]
    checked = 0
    for spec in specs:
        matcher = spec if not isinstance(spec, dict | list) else compile_matcher(spec, "test")
        for etype, channel, props in itertools.product(types, ["web", "app", "store"], prop_sets):
            event = tp("e", T0, etype=etype, channel=channel, **props).event
            p = properties_of(event)
            possible, predicate, _needs = matcher.for_type(etype)
            specialised = possible and (predicate is None or predicate(event, p))
            assert specialised == matcher(event, p), (spec, etype, channel, props)
            checked += 1
    assert checked > 1_000
