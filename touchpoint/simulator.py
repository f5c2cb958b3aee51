"""Simulated customer traffic: realistic multi-channel touchpoint events, deterministically.

The simulator drives the demo, the load tests and the alert scenario tests, so
it is pure: no Kafka, no I/O and no wall clock. Its output is a function of its
arguments alone, and the same seed gives the same events, ids included.

How it works. About ``rate * mean_gap`` sessions are active at once, kept in a
heap keyed by the time of each one's next event. A session is a scripted
journey: a generator yielding ``(delay_seconds, event)`` that walks a customer
through the funnel (an ad click or a newsletter, product views, a cart, a
checkout, a payment, a survey...). When a session ends a new one takes its
place: a fresh visitor, a known customer coming back, or a follow-up scheduled
hours or days earlier (a cart reminder, an unresolved support case, order
tracking after a purchase). The number of live sessions follows a running
mean of the gaps, so the event rate stays near ``rate`` whatever the mix of
journeys, incidents included.

Incidents (:class:`Incident`) switch behaviour on for a window of simulated
time: ``payment_outage`` makes most online payments fail, so carts are
abandoned and support contacts about payment and detractor surveys follow;
``app_errors`` makes app sessions hit the same error again and again.

Speed: about 70-80k events/s on one core with CPython 3.11 (printed by
``tests/unit/test_simulator.py::test_200k_events_are_unique_ordered_and_fast``).
"""

from __future__ import annotations

import collections
import gc
import math
import re
from bisect import bisect
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from heapq import heappop, heappush
from random import Random
from typing import Any

from schemas.registry import uri_for
from touchpoint.producer import SOURCE_OF_CHANNEL

__all__ = ["INCIDENT_KINDS", "SOURCE_OF_CHANNEL", "Incident", "Simulator", "event_time_ms"]

INCIDENT_KINDS = ("payment_outage", "app_errors")

_INCIDENT_TEXT = re.compile(
    r"^\s*([a-z_]+)\s*@\s*([0-9]+(?:\.[0-9]*)?)\s*\+\s*([0-9]+(?:\.[0-9]*)?)\s*$"
)


@dataclass(frozen=True)
class Incident:
    """A switchable fault, active in ``[start_s, start_s + duration_s)`` of simulated time."""

    kind: str
    start_s: float
    duration_s: float

    def __post_init__(self) -> None:
        if self.kind not in INCIDENT_KINDS:
            raise ValueError(
                f"unknown incident kind {self.kind!r}; known kinds: {', '.join(INCIDENT_KINDS)}"
            )
        if not (math.isfinite(self.start_s) and self.start_s >= 0):
            raise ValueError(f"incident start must be a finite number >= 0 s, got {self.start_s}")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(
                f"incident duration must be a finite number > 0 s, got {self.duration_s}"
            )

    @classmethod
    def parse(cls, text: str) -> Incident:
        """Parse ``KIND@START+DURATION`` (seconds), e.g. ``"payment_outage@60+120"``."""
        match = _INCIDENT_TEXT.match(text)
        if match is None:
            raise ValueError(
                f"bad incident {text!r}: expected KIND@START+DURATION in seconds, "
                f"e.g. 'payment_outage@60+120' (kinds: {', '.join(INCIDENT_KINDS)})"
            )
        kind, start, duration = match.groups()
        return cls(kind, float(start), float(duration))

    def active(self, t: float) -> bool:
        """Whether the incident is on at ``t`` seconds after the simulator's start."""
        return self.start_s <= t < self.start_s + self.duration_s


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)


def event_time_ms(event: dict[str, Any]) -> int:
    """The event's ``occurred_at`` in epoch milliseconds, whichever form it uses."""
    value = event["occurred_at"]
    if isinstance(value, int):
        return value
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"occurred_at has no UTC offset: {value!r}")
    # Exact integer arithmetic: float timestamps can be off by a millisecond.
    return (moment - _EPOCH) // _MS


# --- Timestamps --------------------------------------------------------------------------------

_DAY_MS = 86_400_000
_STORE_OFFSET_MS = 3_600_000  # the stores' tills report local time, Central European (winter) time
_day_prefix: dict[int, str] = {}


def _stamp(ms: int, suffix: str) -> str:
    """RFC 3339 with milliseconds for local time ``ms``; far cheaper than strftime per event."""
    day, rest = divmod(ms, _DAY_MS)
    prefix = _day_prefix.get(day)
    if prefix is None:
        prefix = (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%dT")
        _day_prefix[day] = prefix
    hours, rest = divmod(rest, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds, millis = divmod(rest, 1000)
    return f"{prefix}{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}{suffix}"


# --- Catalogues -------------------------------------------------------------------------------

CURRENCY = "EUR"
_SITE = "https://shop.example.com"
_EVENT_TYPES = (
    "ad_click", "app_open", "cart_add", "cart_remove", "checkout_start", "email_bounce",
    "email_click", "email_open", "email_sent", "error", "identify", "page_view", "payment_failed",
    "pos_purchase", "product_view", "purchase", "referral", "review", "screen_view", "search",
    "social_interaction", "store_visit", "support_contact", "survey_response", "unsubscribe",
)  # fmt: skip
_URI = {name: uri_for(name) for name in _EVENT_TYPES}
_CATEGORIES = ("shoes", "jackets", "bags", "accessories", "sport", "kids", "home", "beauty")
_SEARCHES = (
    "running shoes", "rain jacket", "backpack", "sneakers white", "gift ideas", "wool scarf",
    "yoga mat", "kids boots", "leather bag", "sale", "sunglasses", "trail shoes", "",
)  # fmt: skip
_CONTENT_PAGES = ("/", "/sale", "/new-arrivals", "/stores", "/help", "/blog/care-guide")
_AD_CAMPAIGNS = ("ads-q4-brand", "ads-q4-shoes", "ads-retargeting", "ads-black-friday")
_AD_NETWORKS = ("google", "meta", "tiktok", "bing")
_SOCIAL_NETWORKS = ("instagram", "tiktok", "facebook", "pinterest", "x")
_EMAIL_CAMPAIGNS = ("newsletter-wk45", "new-arrivals", "black-friday-teaser", "loyalty-points")
_STORES = tuple(
    f"store-{city}-{n:02d}" for city in ("berlin", "paris", "madrid", "milan") for n in (1, 2, 3)
)
_APP_VERSIONS = ("5.2.0", "5.2.1", "5.3.0")
_SCREENS = ("category", "wishlist", "account", "offers", "stores")
_SERVER_ERRORS = ("HTTP_500", "HTTP_404", "HTTP_503")
_APP_INCIDENT_ERRORS = ("SYNC_TIMEOUT", "CRASH_CART_VIEW")

# Survey ids are long-lived survey definitions, not per-response ids.
_SURVEY_AFTER = {"purchase": "srv-post-purchase", "support": "srv-support", "store": "srv-store"}


def _table(pairs: Sequence[tuple[Any, float]]) -> tuple[tuple[Any, ...], list[float]]:
    """A weighted-choice table for :func:`_pick` (values and cumulative weights)."""
    values = tuple(value for value, _ in pairs)
    cum, total = [], 0.0
    for _, weight in pairs:
        total += weight
        cum.append(total)
    return values, [c / total for c in cum]


def _pick(rnd: Callable[[], float], table: tuple[tuple[Any, ...], list[float]]) -> Any:
    values, cum = table
    return values[min(bisect(cum, rnd()), len(values) - 1)]


_PAYMENT_METHODS = _table(
    [("card", 55), ("paypal", 20), ("apple_pay", 12), ("google_pay", 8), ("gift_card", 5)]
)
# Why payments fail on a normal day (the schema's reasons; gateway trouble is rare).
_FAIL_REASONS = _table(
    [("declined", 35), ("insufficient_funds", 20), ("3ds_failed", 20), ("fraud_check", 5),
     ("timeout", 10), ("gateway_error", 5), ("other", 5)]
)  # fmt: skip
_SUPPORT_TOPICS = _table(
    [("delivery", 30), ("returns", 20), ("account", 15), ("product", 13), ("payment", 12),
     ("other", 10)]
)  # fmt: skip
_MEDIUMS = _table([("chat", 45), ("call", 35), ("ticket", 20)])
_SOCIAL_ACTIONS = _table(
    [("like", 40), ("comment", 20), ("share", 15), ("follow", 10), ("mention", 10), ("message", 5)]
)
_OS = _table([("ios", 55), ("android", 43), ("other", 2)])
# Score distributions: mostly happy customers (NPS about +40), and detractors for the unlucky.
_SCORES = {
    ("nps", "good"): _table(list(enumerate([1, 1, 1, 1.5, 1.5, 3, 6, 12, 18, 25, 30]))),
    ("csat", "good"): _table([(1, 4), (2, 6), (3, 12), (4, 33), (5, 45)]),
    ("ces", "good"): _table([(1, 30), (2, 30), (3, 18), (4, 10), (5, 6), (6, 4), (7, 2)]),
    ("nps", "bad"): _table(list(enumerate([20, 12, 12, 14, 14, 14, 14]))),
    ("csat", "bad"): _table([(1, 60), (2, 40)]),
    ("ces", "bad"): _table([(5, 30), (6, 35), (7, 35)]),
}
_RATINGS = _table([(1, 5), (2, 5), (3, 12), (4, 30), (5, 48)])
_BAD_COMMENTS = ("Payment kept failing", "Could not pay, gave up", "Waited ages for support")

# Session mix for fresh sessions (returns scheduled by earlier journeys come on top).
_JOURNEYS = _table(
    [("web", 42), ("app", 20), ("email", 20), ("store", 8), ("support", 3), ("social", 7)]
)

# Mean seconds between consecutive events of a slot (gaps inside journeys and before a new
# one), measured over the journey mix above. It sets the initial number of live sessions;
# a running mean of the actual gaps takes over from there.
_MEAN_GAP_S = 35.4
_GAP_EWMA_ALPHA = 2e-4
# Fresh journeys start with their short gaps (ad click, landing page...), so a cohort of
# brand-new sessions out-produces the same number of sessions in steady state.
_FRESH_START = 0.75
# Feedback on the rate actually produced corrects what the running mean gap misses (a
# cohort of journeys in step, a mix that shifts): every bucket of event time nudges the
# number of live sessions by (wanted / observed) ** gain.
_RATE_GAIN = 0.2
_BOOST_LIMITS = (0.5, 2.0)
# Seconds from a random instant to a live session's next event, in steady state: quantiles
# at 0%, 5%, ... 100%, measured over long runs. Starting the first sessions this far out
# (rather than all at once) makes the rate flat from the first second.
_STEADY_WAIT_S = (
    0.0, 1.8, 3.7, 5.7, 7.9, 10.1, 12.6, 15.1, 17.8, 20.9, 24.4,
    27.9, 31.9, 36.4, 41.6, 47.8, 56.6, 76.3, 123.9, 197.3, 400.0,
)  # fmt: skip
_MAX_PENDING_RETURNS = 200_000  # bounds memory over simulated weeks; the excess is dropped

Event = dict[str, Any]
Journey = Generator[tuple[float, Event], None, Any]


# --- Sessions ---------------------------------------------------------------------------------


class _Session:
    """One visitor's scripted visit: identity, the session's own clock and what went wrong."""

    __slots__ = ("aid", "cid", "hint", "identify_as", "now", "outage_hit", "payment_trouble")

    def __init__(self, now: float, cid: str | None, aid: str | None = None) -> None:
        self.now = now  # time of the session's latest (already scripted) event
        self.cid = cid
        self.aid = aid
        self.hint: str | None = None
        self.identify_as: str | None = None  # how an anonymous visitor would identify, if ever
        self.payment_trouble = False
        self.outage_hit = False  # a payment failed because of a payment_outage incident

    def ev(self, delay: float, event_type: str, channel: str, props: Event) -> tuple[float, Event]:
        """Script the next event ``delay`` seconds after the previous one.

        ``event_id`` and ``occurred_at`` are filled in when the event is emitted;
        the placeholders keep the usual field order.
        """
        self.now += delay
        event: Event = {
            "schema": _URI[event_type],
            "event_id": "",
            "event_type": event_type,
            "channel": channel,
            "occurred_at": 0,
        }
        if self.cid is not None:
            event["customer_id"] = self.cid
            # The cookie or device id still travels with web/app events after identify.
            if self.aid is not None and (
                channel == "web" or channel == "app" or event_type == "identify"
            ):
                event["anonymous_id"] = self.aid
        else:
            event["anonymous_id"] = self.aid
        if self.hint is not None and (channel == "web" or channel == "app"):
            event["session_hint"] = self.hint
        event["properties"] = props
        return delay, event


# --- Journey scripts --------------------------------------------------------------------------
# Each script is a generator over (delay, event); ``yield from`` composes them. Sub-scripts
# return what the caller needs to know (e.g. whether the cart was bought).


def _survey(
    sim: Simulator, s: _Session, channel: str, kinds: tuple[str, ...], after: str, delay: float
) -> Journey:
    """A survey answer; detractor scores once a payment outage hit this customer."""
    rnd = sim.rng.random
    kind = sim.rng.choice(kinds)
    mood = "bad" if s.outage_hit or (s.payment_trouble and rnd() < 0.5) else "good"
    props: Event = {"survey": kind, "score": _pick(rnd, _SCORES[kind, mood])}
    props["survey_id"] = _SURVEY_AFTER[after]
    if mood == "bad" and rnd() < 0.4:
        props["comment"] = sim.rng.choice(_BAD_COMMENTS)
    yield s.ev(delay, "survey_response", channel, props)


def _support_contact(sim: Simulator, s: _Session, topic: str, delay: float) -> Journey:
    """A call, chat or ticket; unresolved cases often come back within days."""
    rng = sim.rng
    rnd = rng.random
    medium = _pick(rnd, _MEDIUMS)
    outage = sim.active("payment_outage", s.now + delay)
    props: Event = {"medium": medium, "topic": topic, "contact_id": sim.new_id(medium)}
    if medium != "ticket":
        # Queues get long when everyone calls about the same outage.
        props["wait_s"] = int(rng.expovariate(1 / (600 if outage else 90)))
    resolved = rnd() < (0.2 if s.outage_hit else 0.7)
    props["resolved"] = resolved
    yield s.ev(delay, "support_contact", "support", props)
    if rnd() < (0.45 if s.outage_hit else 0.3):
        # Asked right after the call or chat, while it is fresh.
        yield from _survey(
            sim, s, "support", ("csat", "csat", "ces"), "support", rng.uniform(20, 120)
        )
    if not resolved and s.cid is not None and rnd() < 0.6:
        sim.schedule(s.now + rng.uniform(3600, 2 * 86400), _support_case, s.cid, (topic,))


def _identify(sim: Simulator, s: _Session, channel: str, method: str) -> Journey:
    """Link the anonymous visitor to a customer id (a new one on signup)."""
    s.cid = sim.link(s.aid, method)
    sim.hold(s.cid)
    s.identify_as = None
    yield s.ev(sim.rng.uniform(5, 40), "identify", channel, {"method": method})


def _pay(
    sim: Simulator, s: _Session, channel: str, cart_id: str, value: float, items: int
) -> Journey:
    """Checkout and payment attempts; returns True when the order went through."""
    rng = sim.rng
    rnd = rng.random
    checkout = {"cart_id": cart_id, "value": value, "currency": CURRENCY}
    yield s.ev(rng.uniform(10, 60), "checkout_start", channel, checkout)
    if rnd() < 0.04:  # shipping costs, a missing discount code...
        return False
    if channel == "web" and rnd() < 0.005:
        error = {"error_code": "CHECKOUT_VALIDATION", "page": f"{_SITE}/checkout"}
        yield s.ev(rng.uniform(5, 30), "error", channel, error)
    method = _pick(rnd, _PAYMENT_METHODS)
    attempt = 0
    while True:
        attempt += 1
        delay = rng.uniform(20, 110) if attempt == 1 else rng.uniform(8, 50)
        outage = sim.active("payment_outage", s.now + delay)
        if rnd() < (0.7 if outage else 0.02):
            s.payment_trouble = True
            if outage:
                s.outage_hit = True
                reason = "gateway_error" if rnd() < 0.7 else "timeout"
            else:
                reason = _pick(rnd, _FAIL_REASONS)
            failed = {
                "cart_id": cart_id,
                "reason": reason,
                "payment_method": method,
                "amount": value,
                "currency": CURRENCY,
            }
            yield s.ev(delay, "payment_failed", channel, failed)
            # Customers retry once or twice, then give up.
            if attempt > 2 or rnd() >= (0.85, 0.55)[attempt - 1]:
                return False
            if reason in ("declined", "insufficient_funds", "3ds_failed") and rnd() < 0.5:
                method = _pick(rnd, _PAYMENT_METHODS)
        else:
            order = {
                "order_id": sim.new_id("ord"),
                "cart_id": cart_id,
                "value": value,
                "currency": CURRENCY,
                "items": items,
            }
            yield s.ev(delay, "purchase", channel, order)
            return True


def _shop(
    sim: Simulator, s: _Session, channel: str, viewed: list[tuple[str, str, float]]
) -> Journey:
    """Cart, checkout, payment and what follows: a survey, a reminder, a support contact."""
    rng = sim.rng
    rnd = rng.random
    cart_id = sim.new_id("cart")
    cart: list[tuple[str, int, float]] = []
    for i in range(1 + (rnd() < 0.35) + (rnd() < 0.15)):
        if i < len(viewed):
            product_id, _, price = viewed[i]
        else:
            product_id, category, price = sim.product()
            view = {"product_id": product_id, "category": category, "price": price}
            yield s.ev(rng.uniform(8, 60), "product_view", channel, view)
        quantity = 1 if rnd() < 0.85 else 2
        cart.append((product_id, quantity, price))
        add = {"cart_id": cart_id, "product_id": product_id, "quantity": quantity, "price": price}
        yield s.ev(rng.uniform(5, 45), "cart_add", channel, add)
    if rnd() < 0.12:  # second thoughts
        product_id, quantity, _ = cart.pop(int(rnd() * len(cart)))
        remove = {"cart_id": cart_id, "product_id": product_id, "quantity": quantity}
        yield s.ev(rng.uniform(5, 40), "cart_remove", channel, remove)
    value = round(sum(q * p for _, q, p in cart), 2)
    items = sum(q for _, q, _ in cart)
    # About one cart in five is never bought on a normal day; most are left before checkout.
    if not cart or rnd() < 0.1:
        if cart and rnd() < 0.5:
            sim.schedule(
                s.now + rng.uniform(3600, 20 * 3600), _cart_reminder, s.cid, (cart_id, value, items)
            )
        return False
    if s.cid is None:
        # Guest checkout identifies the visitor too.
        yield from _identify(sim, s, channel, s.identify_as or "checkout")
    bought = yield from _pay(sim, s, channel, cart_id, value, items)
    if bought:
        if rnd() < 0.2:
            yield from _survey(sim, s, channel, ("nps", "csat"), "purchase", rng.uniform(30, 180))
        if rnd() < 0.3:
            sim.schedule(
                s.now + rng.uniform(86400, 4 * 86400),
                _post_purchase,
                s.cid,
                (channel, cart[0][0], s.outage_hit),
            )
    else:
        if s.payment_trouble and rnd() < (0.6 if s.outage_hit else 0.15):
            yield from _support_contact(sim, s, "payment", rng.uniform(20, 240))
        if rnd() < 0.5:
            sim.schedule(
                s.now + rng.uniform(3600, 20 * 3600), _cart_reminder, s.cid, (cart_id, value, items)
            )
    return bought


def _browse(sim: Simulator, s: _Session, channel: str) -> Generator[Any, None, list[Any]]:
    """Product views, searches and pages; returns the products looked at."""
    rng = sim.rng
    rnd = rng.random
    viewed: list[tuple[str, str, float]] = []
    if s.cid is not None and rnd() < 0.03:
        # A returning customer reviews an earlier order before browsing on.
        review = {"product_id": sim.product()[0], "rating": _pick(rnd, _RATINGS)}
        yield s.ev(rng.uniform(20, 120), "review", channel, review)
    for _ in range(1 + min(int(rng.expovariate(1 / 3)), 12)):
        r = rnd()
        delay = rng.uniform(6, 70)
        if r < 0.5:
            product_id, category, price = product = sim.product()
            viewed.append(product)
            view = {"product_id": product_id, "category": category, "price": price}
            yield s.ev(delay, "product_view", channel, view)
        elif r < 0.7:
            query = rng.choice(_SEARCHES)
            results = 0 if rnd() < 0.1 else int(rng.expovariate(1 / 40)) + 1
            yield s.ev(delay, "search", channel, {"query": query, "results": results})
        elif channel == "web":
            page = rng.choice(_CONTENT_PAGES)
            yield s.ev(delay, "page_view", channel, {"url": _SITE + page})
        else:
            yield s.ev(delay, "screen_view", channel, {"screen": rng.choice(_SCREENS)})
        if channel == "app" and sim.active("app_errors", s.now) and rnd() < 0.6:
            # The broken screen keeps failing with the same code while the user retries.
            code = "API_503" if rnd() < 0.7 else rng.choice(_APP_INCIDENT_ERRORS)
            for _ in range(rng.randint(3, 5)):
                yield s.ev(rng.uniform(2, 12), "error", channel, {"error_code": code})
            if rnd() < 0.4:
                return []  # gave up
        elif rnd() < 0.01:
            code = rng.choice(_SERVER_ERRORS) if channel == "web" else "API_500"
            yield s.ev(rng.uniform(1, 5), "error", channel, {"error_code": code})
        if s.identify_as in ("login", "signup") and rnd() < 0.3:
            yield from _identify(sim, s, channel, s.identify_as)
    return viewed


def _web_visit(sim: Simulator, s: _Session, campaign: str | None = None) -> Journey:
    """Awareness to purchase on the website: arrive, browse, maybe buy."""
    rng = sim.rng
    rnd = rng.random
    r = rnd()
    if campaign is not None:  # clicked through from an email
        landing = {"url": f"{_SITE}/campaign/{campaign}", "utm_source": "email"}
        landing["utm_campaign"] = campaign
        yield s.ev(rng.uniform(1, 4), "page_view", "web", landing)
    elif r < 0.18:
        campaign, network = rng.choice(_AD_CAMPAIGNS), rng.choice(_AD_NETWORKS)
        url = f"{_SITE}/lp/{campaign}"
        yield s.ev(
            rng.uniform(0, 20),
            "ad_click",
            "ads",
            {"campaign_id": campaign, "network": network, "url": url},
        )
        landing = {"url": url, "referrer": f"https://{network}.com/", "utm_source": network}
        landing["utm_campaign"] = campaign
        yield s.ev(rng.uniform(1, 4), "page_view", "web", landing)
    elif r < 0.28:
        network = rng.choice(_SOCIAL_NETWORKS)
        action = {"network": network, "action": _pick(rnd, _SOCIAL_ACTIONS)}
        yield s.ev(rng.uniform(0, 20), "social_interaction", "social", action)
        landing = {"url": f"{_SITE}/", "referrer": f"https://{network}.com/", "utm_source": network}
        yield s.ev(rng.uniform(2, 30), "page_view", "web", landing)
    else:
        page = rng.choice(_CONTENT_PAGES)
        landing = {"url": _SITE + page, "title": "Shop"}
        if rnd() < 0.5:
            landing["referrer"] = "https://www.google.com/"
        yield s.ev(rng.uniform(0, 20), "page_view", "web", landing)
    viewed = yield from _browse(sim, s, "web")
    if viewed and rnd() < (0.3 if s.cid is not None else 0.18):
        yield from _shop(sim, s, "web", viewed)
    elif s.identify_as in ("login", "signup") and rnd() < 0.5:
        yield from _identify(sim, s, "web", s.identify_as)


def _app_session(sim: Simulator, s: _Session) -> Journey:
    """A mobile app session: open, browse screens, maybe buy."""
    rng = sim.rng
    rnd = rng.random
    opened = {"app_version": rng.choice(_APP_VERSIONS), "os": _pick(rnd, _OS)}
    yield s.ev(rng.uniform(0, 20), "app_open", "app", opened)
    yield s.ev(rng.uniform(1, 6), "screen_view", "app", {"screen": "home"})
    viewed = yield from _browse(sim, s, "app")
    if viewed and rnd() < (0.3 if s.cid is not None else 0.15):
        yield from _shop(sim, s, "app", viewed)


def _email_campaign(sim: Simulator, s: _Session, campaign: str | None = None) -> Journey:
    """A campaign email: most go unread; some opens click through to the shop."""
    rng = sim.rng
    rnd = rng.random
    campaign = campaign or rng.choice(_EMAIL_CAMPAIGNS)
    message = {"campaign_id": campaign, "message_id": sim.new_id("msg")}
    yield s.ev(rng.uniform(0, 20), "email_sent", "email", message)
    r = rnd()
    if r < 0.02:
        bounce = {**message, "bounce_type": "hard" if rnd() < 0.3 else "soft"}
        yield s.ev(rng.uniform(1, 30), "email_bounce", "email", bounce)
        return
    if r < 0.57:
        return  # not opened
    yield s.ev(rng.uniform(30, 400), "email_open", "email", message)
    if rnd() < 0.015:
        leave = {"campaign_id": campaign, "list_id": "newsletter"}
        yield s.ev(rng.uniform(5, 40), "unsubscribe", "email", leave)
        return
    if rnd() < 0.35:
        click = {**message, "url": f"{_SITE}/campaign/{campaign}"}
        yield s.ev(rng.uniform(3, 40), "email_click", "email", click)
        s.hint = sim.new_hint("ws")
        yield from _web_visit(sim, s, campaign)


def _store_visit(sim: Simulator, s: _Session) -> Journey:
    """A store visit, usually with a purchase at the till."""
    rng = sim.rng
    rnd = rng.random
    store_id = rng.choice(_STORES)
    visit = {"store_id": store_id, "duration_s": int(rng.uniform(120, 2400))}
    yield s.ev(rng.uniform(0, 20), "store_visit", "store", visit)
    if s.cid is None and s.identify_as is not None:
        yield from _identify(sim, s, "store", "loyalty_card")
    if rnd() < 0.4:
        return
    if rnd() < 0.01:
        offline = {"error_code": "POS_TERMINAL_OFFLINE", "message": "terminal lost connection"}
        yield s.ev(rng.uniform(60, 400), "error", "store", offline)
    order_id = sim.new_id("pos")
    value = round(sum(sim.product()[2] for _ in range(1 + int(rng.expovariate(1.2)))), 2)
    # Tills use another acquirer, so an online payment outage leaves them alone.
    if rnd() < 0.02:
        failed = {
            "order_id": order_id,
            "reason": _pick(rnd, _FAIL_REASONS),
            "payment_method": "card",
        }
        failed.update(amount=value, currency=CURRENCY)
        yield s.ev(rng.uniform(60, 400), "payment_failed", "store", failed)
    till = {"store_id": store_id, "order_id": order_id, "value": value, "currency": CURRENCY}
    till["items"] = 1 + int(value // 80)
    yield s.ev(rng.uniform(30, 400), "pos_purchase", "store", till)
    if rnd() < 0.08:
        yield from _survey(sim, s, "store", ("csat", "nps"), "store", rng.uniform(60, 600))


def _support_case(sim: Simulator, s: _Session, topic: str | None = None) -> Journey:
    """A customer gets in touch with support, sometimes after checking the help pages."""
    rng = sim.rng
    topic = topic or _pick(rng.random, _SUPPORT_TOPICS)
    if rng.random() < 0.25:
        help_page = {"url": f"{_SITE}/help/{topic}", "title": "Help"}
        yield s.ev(rng.uniform(0, 20), "page_view", "web", help_page)
    yield from _support_contact(sim, s, topic, rng.uniform(5, 60))


def _social(sim: Simulator, s: _Session) -> Journey:
    """Engagement on social networks without a visit to the shop."""
    rng = sim.rng
    rnd = rng.random
    network = rng.choice(_SOCIAL_NETWORKS)
    for _ in range(1 + int(rng.expovariate(1.5))):
        action = {"network": network, "action": _pick(rnd, _SOCIAL_ACTIONS)}
        yield s.ev(rng.uniform(0, 90), "social_interaction", "social", action)
    if rnd() < 0.05 and s.cid is not None:
        yield s.ev(rng.uniform(5, 60), "referral", "social", {"referral_code": sim.referral(s.cid)})


def _post_purchase(
    sim: Simulator, s: _Session, channel: str, product_id: str, unhappy: bool
) -> Journey:
    """Days after an order: tracking it, and perhaps a review, a referral or an NPS survey."""
    rng = sim.rng
    rnd = rng.random
    s.outage_hit = unhappy
    if channel == "app":
        yield s.ev(rng.uniform(0, 20), "app_open", "app", {"os": _pick(rnd, _OS)})
        yield s.ev(rng.uniform(2, 10), "screen_view", "app", {"screen": "order_tracking"})
    else:
        yield s.ev(rng.uniform(0, 20), "page_view", "web", {"url": f"{_SITE}/account/orders"})
    if rnd() < 0.1:
        yield from _support_contact(sim, s, "delivery", rng.uniform(60, 300))
        return
    if rnd() < 0.3:
        rating = rng.choice((1, 2, 3)) if unhappy else _pick(rnd, _RATINGS)
        review = {"product_id": product_id, "rating": rating}
        yield s.ev(rng.uniform(30, 180), "review", channel, review)
    if rnd() < 0.08 and not unhappy and s.cid is not None:
        yield s.ev(rng.uniform(10, 60), "referral", channel, {"referral_code": sim.referral(s.cid)})
    if rnd() < 0.25:
        yield from _survey(sim, s, "email", ("nps",), "purchase", rng.uniform(60, 600))


def _cart_reminder(sim: Simulator, s: _Session, cart_id: str, value: float, items: int) -> Journey:
    """Hours after an abandoned cart: a reminder email that sometimes wins the order back."""
    rng = sim.rng
    rnd = rng.random
    message = {"campaign_id": "cart-reminder", "message_id": sim.new_id("msg")}
    yield s.ev(rng.uniform(0, 20), "email_sent", "email", message)
    if rnd() < 0.45:
        yield s.ev(rng.uniform(30, 400), "email_open", "email", message)
        if rnd() < 0.4:
            click = {**message, "url": f"{_SITE}/cart"}
            yield s.ev(rng.uniform(3, 40), "email_click", "email", click)
            s.hint = sim.new_hint("ws")
            landing = {
                "url": f"{_SITE}/cart",
                "utm_source": "email",
                "utm_campaign": "cart-reminder",
            }
            yield s.ev(rng.uniform(1, 4), "page_view", "web", landing)
            yield from _pay(sim, s, "web", cart_id, value, items)


# --- The simulator ----------------------------------------------------------------------------


class Simulator:
    """Deterministic, infinite stream of ``(source, event)`` in event-time order.

    ``start_ms`` is the event time (epoch ms) of simulated second zero, ``rate``
    the mean events per simulated second, ``customers`` the number of known
    customers, ``anonymous_share`` the share of new web, app and social sessions
    whose visitor is not logged in (0 means no anonymous events at all).

    The simulator is one stream: :meth:`events`, :meth:`take` and :meth:`until`
    all continue where the previous call stopped, and :attr:`stats` counts what
    was produced so far by event type.

    Population size decides how journeys look downstream: a known customer
    starts a session about every ``customers * 5.7 / rate`` seconds (every five
    minutes for 10,000 customers at 200 events/s, so their journeys rarely go
    quiet for 30 minutes and close). For journeys that open and close like a
    real shop's, use about ``1000 * rate`` customers or more; ids cost nothing
    until used.
    """

    def __init__(
        self,
        *,
        seed: int = 0,
        start_ms: int,
        rate: float = 200.0,
        customers: int = 10_000,
        incidents: Sequence[Incident] = (),
        anonymous_share: float = 0.3,
    ) -> None:
        if not (math.isfinite(rate) and rate > 0):
            raise ValueError(f"rate must be > 0 events/s, got {rate}")
        if customers < 1:
            raise ValueError(f"customers must be >= 1, got {customers}")
        if not 0.0 <= anonymous_share <= 1.0:
            raise ValueError(f"anonymous_share must be within [0, 1], got {anonymous_share}")
        self.seed = seed
        self.start_ms = start_ms
        self.rate = rate
        self.customers = customers
        self.incidents = tuple(incidents)
        self.anonymous_share = anonymous_share
        self.rng = Random(seed)
        self.stats: collections.Counter[str] = collections.Counter()
        self._windows = {
            kind: tuple(
                (i.start_s, i.start_s + i.duration_s) for i in self.incidents if i.kind == kind
            )
            for kind in INCIDENT_KINDS
        }
        self._event_prefix = f"sim{seed}-"
        if len(self._event_prefix) > 40:
            raise ValueError("seed is too long to fit in a 64-character event id")
        self._id_prefix = f"{seed:x}-"
        self._emitted = 0
        self._ids = 0
        self._seq = 0
        self._new_customers = customers
        self._busy: collections.Counter[str] = collections.Counter()  # customers in a session
        self._recent_anonymous: list[str] = []
        self._linked: dict[str, str] = {}  # anonymous id -> customer id, once identified
        self._mean_gap = _MEAN_GAP_S
        self._boost = 1.0
        self._bucket_s = max(5.0, 100.0 / rate)  # long enough for ~100 events
        self._bucket_start = 0.0
        self._bucket_events = 0
        self._heap: list[tuple[float, int, _Session, Journey, Event]] = []
        self._returns: list[tuple[float, int, Callable[..., Journey], str, tuple[Any, ...]]] = []
        self._products = self._catalogue(self.rng)
        # Start as if the shop had been open for a while: as many sessions as steady state
        # has, each with its next event as far out as a live session's would be.
        for _ in range(max(1, round(rate * _MEAN_GAP_S * _FRESH_START))):
            self._spawn(0.0, first_at=self._steady_wait())

    # -- public API --

    def events(self) -> Iterator[tuple[str, Event]]:
        """Infinite iterator of ``(source, event)`` in non-decreasing event time.

        Event time is ``start_ms`` plus the simulated seconds; on average
        ``rate`` events per simulated second.
        """
        step = self._step
        while True:
            yield step()

    def take(self, n: int) -> list[tuple[str, Event]]:
        """The next ``n`` events."""
        step = self._step
        # Events hold no reference cycles, but the cyclic GC would still rescan every one
        # kept so far on each full collection: 40% of the time for 200k events.
        paused = gc.isenabled()
        gc.disable()
        try:
            return [step() for _ in range(n)]
        finally:
            if paused:
                gc.enable()

    def until(self, end_ms: int) -> Iterator[tuple[str, Event]]:
        """The next events whose event time is before ``end_ms`` (the rest stay queued)."""
        heap, start_ms, step = self._heap, self.start_ms, self._step
        while start_ms + int(heap[0][0] * 1000.0) < end_ms:
            yield step()

    # -- helpers for the journey scripts --

    def active(self, kind: str, t: float) -> bool:
        """Whether an incident of ``kind`` is on at simulated second ``t``."""
        return any(start <= t < end for start, end in self._windows[kind])

    def new_id(self, kind: str) -> str:
        self._ids += 1
        return f"{kind}-{self._id_prefix}{self._ids:08d}"

    def new_hint(self, kind: str) -> str:
        return f"{kind}-{self.rng.getrandbits(48):012x}"

    def link(self, aid: str | None, method: str) -> str:
        """The customer an anonymous device identifies as (the same one if it did before)."""
        cid = self._linked.get(aid) if aid is not None else None
        if cid is None:
            if method == "signup":  # a customer beyond the initial population
                self._new_customers += 1
                cid = f"cust-{self._new_customers:06d}"
            else:
                cid = self.pick_customer()
            if aid is not None:
                self._linked[aid] = cid
        return cid

    def pick_customer(self) -> str:
        """A known customer, preferring one who is not in a session already."""
        rnd, customers = self.rng.random, self.customers
        for _ in range(8):
            cid = f"cust-{int(rnd() * customers):06d}"
            if cid not in self._busy:
                return cid
        return cid  # a small population is shared by concurrent sessions

    def hold(self, cid: str) -> None:
        self._busy[cid] += 1

    def product(self) -> tuple[str, str, float]:
        """A product, popular ones more often: ``(product_id, category, price)``."""
        products = self._products
        return products[int(len(products) * self.rng.random() ** 2)]

    def referral(self, cid: str) -> str:
        return "REF-" + cid.rsplit("-", 1)[-1]

    def schedule(
        self, due: float, script: Callable[..., Journey], cid: str | None, args: tuple[Any, ...]
    ) -> None:
        """Have ``cid`` come back at simulated second ``due`` with ``script(sim, session, *args)``.

        Only known customers can be brought back (by email, by their account).
        """
        if cid is not None and len(self._returns) < _MAX_PENDING_RETURNS:
            self._seq += 1
            heappush(self._returns, (due, self._seq, script, cid, args))

    # -- internals --

    @staticmethod
    def _catalogue(rng: Random) -> list[tuple[str, str, float]]:
        products = []
        for n in range(1, 801):
            category = rng.choice(_CATEGORIES)
            price = round(min(rng.lognormvariate(math.log(45), 0.7), 2000.0), 2) or 1.0
            products.append((f"SKU-{n:05d}", category, price))
        return products

    def _anonymous_id(self) -> str:
        recent = self._recent_anonymous
        # Some anonymous devices come back before they ever identify.
        if recent and self.rng.random() < 0.15:
            return recent[int(self.rng.random() * len(recent))]
        aid = f"anon-{self.rng.getrandbits(48):012x}"
        if len(recent) < 2000:
            recent.append(aid)
        else:
            slot = int(self.rng.random() * len(recent))
            self._linked.pop(recent[slot], None)  # forgotten devices do not come back
            recent[slot] = aid
        return aid

    def _visitor(self, now: float, anonymous_share: float) -> _Session:
        rnd = self.rng.random
        if rnd() < anonymous_share:
            s = _Session(now, None, self._anonymous_id())
            r = rnd()
            # Some log in or sign up while browsing; buyers identify at checkout anyway.
            s.identify_as = "login" if r < 0.25 else "signup" if r < 0.35 else None
            return s
        return _Session(now, self.pick_customer())

    def _steady_wait(self) -> float:
        position = self.rng.random() * (len(_STEADY_WAIT_S) - 1)
        i = int(position)
        low, high = _STEADY_WAIT_S[i], _STEADY_WAIT_S[i + 1]
        return low + (high - low) * (position - i)

    def _spawn(self, now: float, first_at: float | None = None) -> None:
        """Start the next session at ``now``: a scheduled return if one is due, else a fresh one.

        ``first_at`` overrides when its first event happens (for the initial sessions).
        """
        rng = self.rng
        returns = self._returns
        if returns and returns[0][0] <= now:
            _, _, script, cid, args = heappop(returns)
            s = _Session(now, cid)
            journey = script(self, s, *args)
        else:
            kind = _pick(rng.random, _JOURNEYS)
            if kind == "web":
                s = self._visitor(now, self.anonymous_share)
                s.hint = self.new_hint("ws")
                journey = _web_visit(self, s)
            elif kind == "app":
                s = self._visitor(now, self.anonymous_share)
                s.hint = self.new_hint("as")
                journey = _app_session(self, s)
            elif kind == "social":
                s = self._visitor(now, self.anonymous_share)
                journey = _social(self, s)
            elif kind == "store":
                # Cash customers without a loyalty card are anonymous at the till.
                s = self._visitor(now, self.anonymous_share / 2)
                s.identify_as = "loyalty_card" if rng.random() < 0.2 else None
                journey = _store_visit(self, s)
            elif kind == "email":
                s = _Session(now, self.pick_customer())
                journey = _email_campaign(self, s)
            else:
                s = _Session(now, self.pick_customer())
                journey = _support_case(self, s)
        if s.cid is not None:
            self._busy[s.cid] += 1
        self._advance(s, journey, first_at)

    def _advance(self, s: _Session, journey: Journey, at: float | None = None) -> bool:
        """Script the session's next event and queue it; False when the journey is over."""
        try:
            delay, event = next(journey)
        except StopIteration:
            return False
        if at is None:
            self._mean_gap += (delay - self._mean_gap) * _GAP_EWMA_ALPHA
        else:
            s.now = at
        self._seq += 1
        heappush(self._heap, (s.now, self._seq, s, journey, event))
        return True

    def _finish(self, s: _Session, now: float) -> None:
        busy = self._busy
        if s.cid is not None:
            busy[s.cid] -= 1
            if busy[s.cid] <= 0:
                del busy[s.cid]
        # Keep about rate * mean gap sessions live so the event rate holds whatever the mix.
        target = self.rate * self._mean_gap * self._boost
        for _ in range(2):
            if len(self._heap) >= target:
                break
            self._spawn(now)

    def _tune(self, t: float) -> None:
        """Close a bucket of event time and steer the number of live sessions by its rate."""
        observed = self._bucket_events / (t - self._bucket_start)
        error = self.rate / max(observed, self.rate / 4)
        low, high = _BOOST_LIMITS
        self._boost = min(max(self._boost * error**_RATE_GAIN, low), high)
        self._bucket_start = t
        self._bucket_events = 0

    def _step(self) -> tuple[str, Event]:
        t, _, s, journey, event = heappop(self._heap)
        ms = self.start_ms + int(t * 1000.0)
        self._emitted += 1
        event["event_id"] = f"{self._event_prefix}{self._emitted:09d}"
        r = self.rng.random()
        channel = event["channel"]
        if r < 0.15:
            event["occurred_at"] = ms
        elif channel == "store" and r < 0.5:
            event["occurred_at"] = _stamp(ms + _STORE_OFFSET_MS, "+01:00")
        else:
            event["occurred_at"] = _stamp(ms, "Z")
        self.stats[event["event_type"]] += 1
        if t >= self._bucket_start + self._bucket_s:
            self._tune(t)
        self._bucket_events += 1
        if not self._advance(s, journey):
            self._finish(s, t)
        return SOURCE_OF_CHANNEL[channel], event
