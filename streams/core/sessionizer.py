"""Sessionization: per-customer journeys across channels, by event time (§5).

Pure: the caller passes the stream time (``now``, epoch ms) with every call and
receives the consequences in an :class:`Effects`. Rules, in event time:

- An event continues a journey when it falls within the inactivity gap of one
  of its touchpoints (``ts <= horizon``, where horizon is the max of
  ``touchpoint ts + gap(channel)``), or precedes its start by less than its own
  channel's gap, and the journey would not exceed ``max_duration_ms``. An
  event that bridges two open journeys merges them (so arrival order within the
  grace period does not change the result). Otherwise it starts a journey.
- An event older than ``now - grace_ms`` is late: counted, handed back as a
  :class:`LateEvent`, never added to a journey.
- A journey closes when ``now >= min(horizon, start + max_duration) + grace``:
  from then on no event that is not late can join it. Its ``closed_at`` is that
  deadline, not the moment someone noticed, so replays agree.
- Duplicates (same ``event_id`` among a customer's recent events) are dropped.
- A customer state with no open journey expires ``expire_ms`` after its last
  event (the table must not grow forever).
"""

from __future__ import annotations

import bisect
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any

import msgspec
from xxhash import xxh3_64_intdigest

from schemas.registry import uri_for
from streams.bundles import Merge, Touchpoint, properties_of
from streams.core.clock import iso_ms
from streams.core.journey import (
    ClosedRef,
    CustomerState,
    Journey,
    id_hash,
    journey_id,
    journey_view,
    outcome_of,
)
from streams.core.rules import RuleEngine

MINUTE = 60_000
HOUR = 60 * MINUTE
DAY = 24 * HOUR
JOURNEY_SUMMARY = uri_for("journey_summary")


@dataclass(frozen=True)
class SessionConfig:
    gap_ms: int = 30 * MINUTE
    # Gap after a touchpoint on a given channel, e.g. {"store": 2 * HOUR}.
    channel_gap_ms: Mapping[str, int] = field(default_factory=dict)
    max_duration_ms: int = DAY
    grace_ms: int = 5 * MINUTE
    max_touchpoints: int = 50
    recent_ids: int = 32
    history: int = 5
    max_surveys: int = 10
    max_anonymous_ids: int = 10
    expire_ms: int = 30 * DAY

    def __post_init__(self) -> None:
        if min(self.gap_ms, self.max_duration_ms, self.max_touchpoints) <= 0 or self.grace_ms < 0:
            raise ValueError("gap, max duration and max touchpoints must be > 0, grace >= 0")


@dataclass(frozen=True, slots=True)
class LateEvent:
    touchpoint: Touchpoint
    watermark: int
    lateness_ms: int


@dataclass(slots=True)
class Effects:
    """What applying items produced; the shell publishes it."""

    closed: list[dict[str, Any]] = field(default_factory=list)
    late: list[LateEvent] = field(default_factory=list)
    # (target key, item) to deliver to the partition of the target key.
    forwards: list[tuple[str, Any]] = field(default_factory=list)
    duplicates: int = 0
    # Friction signals: (event time ms, friction_signal record).
    signals: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    # (from stage, to stage) -> times a live journey's current stage changed (-1: none yet).
    transitions: dict[tuple[int, int], int] = field(default_factory=dict)
    # Journeys whose live view changed: key -> state (None when forgotten/expired).
    touched: dict[str, CustomerState | None] = field(default_factory=dict)
    # (survey kind, channel, score) -> survey responses applied (the KPI metrics).
    surveys: dict[tuple[str, str, int], int] = field(default_factory=dict)


class _MergePayload(msgspec.Struct, array_like=True):
    link_event_id: str
    journeys: list[Journey]
    seen: list[int]


class Sessionizer:
    def __init__(
        self, config: SessionConfig | None = None, rules: RuleEngine | None = None
    ) -> None:
        self.config = config or SessionConfig()
        self.rules = rules
        if rules is not None:
            rules.history_slack_ms = self.config.grace_ms
        gaps = self.config.channel_gap_ms
        default = self.config.gap_ms
        self.gap: Callable[[str], int] = lambda channel: gaps.get(channel, default)
        self._gaps = dict(gaps)
        self._gap_default = default
        self._max_duration = self.config.max_duration_ms
        self._grace = self.config.grace_ms
        self._recent_ids = self.config.recent_ids

    # ------------------------------------------------------------ deadlines
    def deadline(self, journey: Journey) -> int:
        limit = journey.start + self._max_duration
        return (journey.horizon if journey.horizon < limit else limit) + self._grace

    def next_deadline(self, state: CustomerState) -> int:
        """The earliest time something is due for this state (close, rule deadline or expiry)."""
        due = self.live_deadline(state)
        return due if due is not None else state.touched + self.config.expire_ms

    def live_deadline(self, state: CustomerState) -> int | None:
        """The earliest journey close or rule deadline; None if only expiry is left."""
        journeys = state.journeys
        earliest = None
        if journeys:
            max_duration, grace = self._max_duration, self._grace
            for j in journeys:
                limit = j.start + max_duration
                due = (j.horizon if j.horizon < limit else limit) + grace
                if earliest is None or due < earliest:
                    earliest = due
        if self.rules is not None and state.rules:
            rule_due = self.rules.next_deadline(state)
            if rule_due is not None and (earliest is None or rule_due < earliest):
                earliest = rule_due
        return earliest

    def close_due(self, state: CustomerState, now: int, fx: Effects) -> bool:
        """Close journeys whose deadline has passed and fire due rules; True if anything changed.

        Journeys close first: an absence rule whose journey closed before its
        own deadline fires at the close, whatever point stream time has
        reached by the time anyone looks (so replays date signals the same).
        """
        max_duration, grace = self._max_duration, self._grace
        due = None
        for j in state.journeys:
            limit = j.start + max_duration
            if (j.horizon if j.horizon < limit else limit) + grace <= now:
                if due is None:
                    due = []
                due.append(j)
        changed = due is not None
        if due is not None:
            state.journeys = [j for j in state.journeys if j not in due]
            for journey in sorted(due, key=self.deadline):
                if self.rules is not None and state.rules:
                    self.rules.on_journey_closed(state, journey, self.deadline(journey), fx)
                summary = self.summary(state.key, journey)
                fx.closed.append(summary)
                state.recent.append(
                    ClosedRef(
                        journey.id,
                        journey.start,
                        journey.last,
                        summary["outcome"],
                        journey.count,
                        summary["channels"],
                    )
                )
            del state.recent[: -self.config.history]
        if self.rules is not None and state.rules:
            before = len(fx.signals)
            self.rules.due(state, now, fx)
            changed = changed or len(fx.signals) > before
            if due is not None:
                self.rules.expire(state, now)
        if changed:
            fx.touched[state.key] = state
        return changed

    def expired(self, state: CustomerState, now: int) -> bool:
        return (
            not state.journeys
            and state.touched + self.config.expire_ms <= now
            and (self.rules is None or self.rules.next_deadline(state) is None)
        )

    # ------------------------------------------------------------ events
    def _seen(self, state: CustomerState, event_id: str) -> bool:
        """Remember ``event_id``; True if it was already among the recent ids."""
        h = id_hash(event_id)
        seen = state.seen
        if h in seen:
            return True
        seen.append(h)
        if len(seen) > self.config.recent_ids:
            del seen[0]
        return False

    def apply(self, state: CustomerState, tp: Touchpoint, now: int, fx: Effects) -> None:
        """Apply one touchpoint for ``state.key``; ``now`` is stream time (>= tp.ts)."""
        event = tp.event
        if state.alias_of is not None and event.customer_id is None:
            # An identified visitor's anonymous event: it belongs to the customer.
            owner = state.alias_of
            fx.forwards.append(
                (
                    owner,
                    msgspec.structs.replace(
                        tp, key=owner, event=msgspec.structs.replace(event, customer_id=owner)
                    ),
                )
            )
            return
        seen = state.seen
        h = xxh3_64_intdigest(event.event_id.encode())  # = id_hash(), inlined (hot path)
        if h in seen:
            fx.duplicates += 1
            if state.journeys:
                state.journeys[-1].dups += 1
            return
        seen.append(h)
        if len(seen) > self._recent_ids:
            del seen[0]
        ts = tp.ts
        if ts > state.touched:
            state.touched = ts
        # Close what is due before placing the event (cheap checks first: most
        # events find nothing due, and close_due is costly).
        due = False
        max_duration, grace = self._max_duration, self._grace
        for j in state.journeys:
            limit = j.start + max_duration
            if (j.horizon if j.horizon < limit else limit) + grace <= now:
                due = True
                break
        if due or (state.rules and self.rules is not None and self.rules.anything_due(state, now)):
            self.close_due(state, now, fx)
        fx.touched[state.key] = state
        if ts < now - self._grace:
            state.late += 1
            if state.journeys:
                state.journeys[-1].late += 1
            fx.late.append(LateEvent(tp, now, now - self._grace - ts))
            return
        journey = self._place(state, ts, event.channel, event.event_id)
        before = journey.last_staged[2] if journey.last_staged else -1
        self._add(journey, tp, fx)
        after = journey.last_staged[2] if journey.last_staged else -1
        if after != before:
            move = (before, after)
            fx.transitions[move] = fx.transitions.get(move, 0) + 1
        if self.rules is not None:
            self.rules.on_touchpoint(state, tp, journey, fx)

    def _accepts(self, journey: Journey, ts: int, channel: str) -> bool:
        limit = self.config.max_duration_ms
        return (
            journey.start - self.gap(channel) <= ts <= journey.horizon
            and ts < journey.start + limit
            and ts > journey.last - limit
        )

    def _place(self, state: CustomerState, ts: int, channel: str, event_id: str) -> Journey:
        journeys = state.journeys
        if len(journeys) == 1:
            # The common case, inlined: the event continues the one open journey.
            j = journeys[0]
            limit = self._max_duration
            if (
                j.start - self._gaps.get(channel, self._gap_default) <= ts <= j.horizon
                and ts < j.start + limit
                and ts > j.last - limit
            ):
                return j
            hits = []
        else:
            hits = [j for j in journeys if self._accepts(j, ts, channel)]
        if not hits:
            journey = Journey(
                id=journey_id(state.key, ts, event_id),
                start=ts,
                last=ts,
                horizon=ts + self.gap(channel),
                count=0,
                tps=[],
                channels={},
            )
            journeys.append(journey)
            if len(journeys) > 1 and journeys[-2].start > ts:
                journeys.sort(key=_START)
            return journey
        target = hits[0]
        for other in hits[1:]:
            span = max(target.last, other.last, ts) - min(target.start, other.start, ts)
            if span < self.config.max_duration_ms:
                self._merge_into(target, other)
                journeys.remove(other)
        return target

    def _add(self, j: Journey, tp: Touchpoint, fx: Effects) -> None:
        ts = tp.ts
        stage = tp.stage
        event = tp.event
        # Kept touchpoints share one string object per channel and event type
        # (decoding makes fresh copies per event): less memory per journey and
        # fewer cache lines to read when the state is encoded or mirrored.
        channel = _intern(event.channel)
        ref = (ts, event.event_id, _intern(event.event_type), channel, stage)
        tps = j.tps
        if not tps or ref >= tps[-1]:
            tps.append(ref)
        else:
            bisect.insort(tps, ref)
        if len(tps) > self.config.max_touchpoints:
            del tps[0]
        j.count += 1
        if ts < j.start:
            j.start = ts
        if ts > j.last:
            j.last = ts
        horizon = ts + self._gaps.get(channel, self._gap_default)
        if horizon > j.horizon:
            j.horizon = horizon
        entry = j.channels.get(channel)
        if entry is None:
            j.channels[channel] = [1, ts]
        else:
            entry[0] += 1
            if ts < entry[1]:
                entry[1] = ts
        if stage >= 0:
            mark = (ts, event.event_id, stage)
            if j.first_staged is None or mark < j.first_staged:
                j.first_staged = mark
            if j.last_staged is None or mark > j.last_staged:
                j.last_staged = mark
            if stage > j.furthest:
                j.furthest = stage
        if event.customer_id is not None:
            j.identified = True
        aid = event.anonymous_id
        if (
            aid is not None
            and aid != tp.key
            and aid not in j.anonymous_ids
            and len(j.anonymous_ids) < self.config.max_anonymous_ids
        ):
            j.anonymous_ids.append(aid)
        if event.event_type in _BUSINESS:
            self._business(j, tp, fx)

    def _business(self, j: Journey, tp: Touchpoint, fx: Effects) -> None:
        event = tp.event
        etype = event.event_type
        get = properties_of(event).get
        cart = j.cart
        if etype == "cart_add":
            quantity = _num(get("quantity"), 1)
            cart.items += int(quantity)
            cart.value += quantity * _num(get("price"), 0.0)
            cart.last_add = max(cart.last_add, tp.ts)
        elif etype == "cart_remove":
            cart.items -= int(_num(get("quantity"), 1))
        elif etype == "checkout_start":
            cart.checkout = max(cart.checkout, tp.ts)
            currency = get("currency")
            if isinstance(currency, str):
                cart.currency = currency
        elif etype in ("purchase", "pos_purchase"):
            j.orders += 1
            j.revenue += _num(get("value"), 0.0)
            if etype == "purchase":
                cart.purchased = max(cart.purchased, tp.ts)
        elif etype == "survey_response":
            kind, score = get("survey"), get("score")
            if isinstance(kind, str) and isinstance(score, int):
                bisect.insort(j.surveys, (tp.ts, kind, score, event.channel))
                del j.surveys[self.config.max_surveys :]
                counted = (kind, event.channel, score)
                fx.surveys[counted] = fx.surveys.get(counted, 0) + 1

    def _merge_into(self, target: Journey, other: Journey) -> None:
        """Merge ``other`` into ``target``: every aggregate is a sum, min, max or union."""
        target.tps = sorted(target.tps + other.tps)[-self.config.max_touchpoints :]
        target.count += other.count
        if (other.start, other.id) < (target.start, target.id):
            target.id = other.id  # the merged journey keeps the earliest journey's id
        target.start = min(target.start, other.start)
        target.last = max(target.last, other.last)
        target.horizon = max(target.horizon, other.horizon)
        for channel, (n, first) in other.channels.items():
            entry = target.channels.get(channel)
            if entry is None:
                target.channels[channel] = [n, first]
            else:
                entry[0] += n
                entry[1] = min(entry[1], first)
        if other.first_staged and (
            target.first_staged is None or other.first_staged < target.first_staged
        ):
            target.first_staged = other.first_staged
        if other.last_staged and (
            target.last_staged is None or other.last_staged > target.last_staged
        ):
            target.last_staged = other.last_staged
        target.furthest = max(target.furthest, other.furthest)
        target.cart.merge(other.cart)
        target.orders += other.orders
        target.revenue += other.revenue
        target.surveys = sorted(target.surveys + other.surveys)[: self.config.max_surveys]
        target.friction += [f for f in other.friction if f not in target.friction]
        for aid in other.anonymous_ids:
            if (
                aid not in target.anonymous_ids
                and len(target.anonymous_ids) < self.config.max_anonymous_ids
            ):
                target.anonymous_ids.append(aid)
        target.identified = target.identified or other.identified
        target.late += other.late
        target.dups += other.dups

    # ------------------------------------------------------------ identity stitching
    def link(
        self, state: CustomerState, customer_id: str, link_event_id: str, ts: int, fx: Effects
    ) -> None:
        """``state.key`` (an anonymous id) now belongs to ``customer_id``: hand its open journeys over."""
        if state.alias_of == customer_id and not state.journeys:
            return  # replayed link
        state.alias_of = customer_id
        if ts > state.touched:
            state.touched = ts  # the alias lives (and expires) from the link on
        payload = _MergePayload(link_event_id, state.journeys, list(state.seen))
        fx.forwards.append(
            (customer_id, Merge(customer_id, state.key, ts, msgspec.to_builtins(payload)))
        )
        state.journeys = []
        fx.touched[state.key] = state

    def merge(self, state: CustomerState, merge: Merge, now: int, fx: Effects) -> None:
        """Take over an anonymous visitor's open journeys (and its recent event ids)."""
        payload = msgspec.convert(merge.payload, _MergePayload)
        if self._seen(state, "merge:" + payload.link_event_id):
            fx.duplicates += 1
            return
        for h in payload.seen:
            if h not in state.seen:
                state.seen.append(h)
        del state.seen[: -self.config.recent_ids]
        if merge.anonymous_id not in state.anonymous_ids:
            state.anonymous_ids.append(merge.anonymous_id)
            del state.anonymous_ids[: -self.config.max_anonymous_ids]
        self.close_due(state, now, fx)
        for anonymous in payload.journeys:
            anonymous.identified = True
            if merge.anonymous_id not in anonymous.anonymous_ids:
                anonymous.anonymous_ids.insert(0, merge.anonymous_id)
                del anonymous.anonymous_ids[self.config.max_anonymous_ids :]
            overlapping = [
                j
                for j in state.journeys
                if j.start - self.config.gap_ms <= anonymous.horizon
                and anonymous.start - self.config.gap_ms <= j.horizon
                and max(j.last, anonymous.last) - min(j.start, anonymous.start)
                < self.config.max_duration_ms
            ]
            if overlapping:
                target = overlapping[0]
                self._merge_into(target, anonymous)
                for other in overlapping[1:]:
                    self._merge_into(target, other)
                    state.journeys.remove(other)
            else:
                state.journeys.append(anonymous)
                state.journeys.sort(key=lambda j: j.start)
            state.touched = max(state.touched, anonymous.last)
        fx.touched[state.key] = state
        # A handed-over journey may already be past its deadline: close it now.
        self.close_due(state, now, fx)

    # ------------------------------------------------------------ output
    def summary(self, key: str, journey: Journey) -> dict[str, Any]:
        """The ``journey_summary`` record of a closed journey."""
        end = min(journey.horizon, journey.start + self.config.max_duration_ms)
        reason = "max_duration" if end < journey.horizon else "inactivity"
        view = journey_view(journey, iso_ms, closed=True)
        return {
            "schema": JOURNEY_SUMMARY,
            "customer_id": key,
            **view,
            "closed_at": iso_ms(end + self.config.grace_ms),
            "close_reason": reason,
            "outcome": outcome_of(journey),
        }


_START = attrgetter("start")
_intern = sys.intern

_BUSINESS = frozenset(
    {"cart_add", "cart_remove", "checkout_start", "purchase", "pos_purchase", "survey_response"}
)


def _num(value: Any, default: float) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else default
