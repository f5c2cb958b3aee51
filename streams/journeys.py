"""The journey stage around the sessionizer: bundles in; state, outputs and Redis out.

Independent of Faust (the Faust wiring is :mod:`streams.app`), so it can be
tested with a dict for a store and fakes for outputs.

State is write-behind. Each customer's state lives in memory while it has open
journeys; :meth:`JourneyProcessor.flush` writes every state changed since the
last flush to the changelog (and the table store), hands the live journeys to
Redis, and the shell acks the input offsets only once all of it is delivered.
Each state remembers the offset of the last bundle applied to it (``pos``), so
after a crash the bundles replayed from the last committed offset are applied
exactly once: a state that already contains a bundle skips it.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec

from schemas.decoder import Rejection
from schemas.registry import uri_for
from sinks import deadletter
from sinks.kafka_out import OutputProducer
from streams.bundles import (
    Forget,
    Link,
    Merge,
    Partitioner,
    Touchpoint,
    decode_bundle,
    properties_of,
)
from streams.core.clock import StreamClock, iso_ms
from streams.core.journey import OUTCOMES, CustomerState, decode_state, encode_state, journey_view
from streams.core.rules import SpikeConfig
from streams.core.sessionizer import Effects, Sessionizer
from streams.core.spikes import WindowCounter
from streams.core.stages import STAGES
from touchpoint import jsonio, metrics
from touchpoint.config import CHANNELS, TopicSettings

log = logging.getLogger(__name__)

LATE_EVENT = uri_for("late_event")
META_PREFIX = b"\x00\x00touchpoint-meta:"
_partial_encoder = msgspec.json.Encoder()
REDIS_TOUCHPOINTS = 20
# Forwarded items per bundle message at most (as ingest's bundle_max_events).
FORWARD_BUNDLE_MAX = 500


class StateStore(Protocol):
    """Where states persist between flushes (a Faust table store in the worker)."""

    def get(self, key: bytes, partition: int) -> bytes | None: ...
    def put(self, key: bytes, partition: int, value: bytes) -> None: ...
    def delete(self, key: bytes, partition: int) -> None: ...
    def commit(self) -> None:
        """Apply the writes since the last commit (stores may batch them)."""

    def scan(self, partition: int) -> Iterable[tuple[bytes, bytes]]: ...
    def page(self, partition: int, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """Up to ``limit`` of the partition's entries with keys after ``after``, in key order.

        For the expiry scan, a page per sweep; a short page ends a pass.
        """
        ...


class JourneyMirror(Protocol):
    """Where live journeys are mirrored (:class:`~sinks.redis_sink.RedisJourneySink`)."""

    def submit(
        self,
        updates: dict[str, bytes | None],
        *,
        resync: bool = False,
        erased: Iterable[str] = (),
    ) -> None: ...


class SortedPages:
    """:meth:`StateStore.page` for stores without key order (dicts): a sorted
    snapshot of the keys taken when a pass starts."""

    def __init__(self) -> None:
        self._keys: dict[int, list[bytes]] = {}

    def page(
        self,
        partition: int,
        after: bytes | None,
        limit: int,
        scan: Callable[[int], Iterable[tuple[bytes, bytes]]],
        get: Callable[[bytes], bytes | None],
    ) -> list[tuple[bytes, bytes]]:
        if after is None or partition not in self._keys:
            self._keys[partition] = sorted(k for k, _v in scan(partition))
        keys = self._keys[partition]
        start = 0 if after is None else bisect.bisect_right(keys, after)
        found = []
        for key in keys[start : start + limit]:
            value = get(key)
            if value is not None:
                found.append((key, value))
        if start + limit >= len(keys):
            del self._keys[partition]  # pass done
        return found


class DictStore:
    """A plain-dict :class:`StateStore` (tests, tools)."""

    def __init__(self, partition_of: Callable[[str], int]) -> None:
        self.data: dict[bytes, bytes] = {}
        self.partition_of = partition_of
        self._pages = SortedPages()

    def get(self, key: bytes, partition: int) -> bytes | None:
        return self.data.get(key)

    def put(self, key: bytes, partition: int, value: bytes) -> None:
        self.data[key] = value

    def delete(self, key: bytes, partition: int) -> None:
        self.data.pop(key, None)

    def commit(self) -> None:
        pass

    def scan(self, partition: int) -> Iterable[tuple[bytes, bytes]]:
        for key, value in list(self.data.items()):
            if key.startswith(META_PREFIX) or self.partition_of(key.decode()) == partition:
                yield key, value

    def page(self, partition: int, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        return self._pages.page(partition, after, limit, self.scan, self.data.get)


def _appender(
    writes: list[tuple[int, bytes, bytes | None]],
) -> Callable[[int, bytes, bytes | None], None]:
    def append(partition: int, key: bytes, value: bytes | None) -> None:
        writes.append((partition, key, value))

    return append


class _Meta(msgspec.Struct, array_like=True):
    watermark: int
    floor: int
    # Signal counts of the windows still open (WindowCounter.dump()).
    counts: list[Any] = msgspec.field(default_factory=list)
    # The offset of the last bundle whose effects this record's flush persisted
    # (-1: unknown, as in records written before it existed).
    applied: int = -1


class _ExpiryView(msgspec.Struct, array_like=True):
    """An encoded :class:`CustomerState` with its bulky fields left undecoded: the
    expiry scan and partition loading read ~5x faster (0.5 us against 2.4 us)."""

    key: str
    journeys: msgspec.Raw
    recent: msgspec.Raw
    seen: msgspec.Raw
    pos: int
    alias_of: str | None
    anonymous_ids: msgspec.Raw
    late: int
    touched: int
    rules: msgspec.Raw


_expiry_view = msgspec.msgpack.Decoder(_ExpiryView)
_NO_JOURNEYS = b"\x90"  # an empty MessagePack array
_NO_RULES = b"\x80"  # an empty MessagePack map


@dataclass
class PartitionState:
    clock: StreamClock
    counter: WindowCounter
    heap: list[tuple[int, str]] = field(default_factory=list)
    scheduled: dict[str, int] = field(default_factory=dict)
    meta_dirty: bool = False
    # Stream time in the last meta record written (see flush).
    persisted_watermark: int = 0
    persisted_floor: int = 0
    # Offsets of bundles: the last one handled, the last one a delivered flush
    # covered, and the latter as found when the partition was taken over (a
    # bundle at or below it is a replay; see JourneyProcessor.handle).
    applied: int = -1
    persisted_applied: int = -1
    replay_through: int = -1
    # Expiry scan of the stored states: the last key of the page scanned
    # (None: no pass running) and when the next pass may start (wall clock).
    expiry_cursor: bytes | None = None
    expiry_scanning: bool = False
    expiry_next_pass: float = 0.0


class JourneyProcessor:
    def __init__(
        self,
        sessionizer: Sessionizer,
        *,
        partitions: int,
        store: StateStore,
        output: OutputProducer,
        topics: TopicSettings,
        redis: JourneyMirror | None = None,
        idle_ms: int = 5_000,
        wall: Callable[[], float] = time.time,
        spikes: SpikeConfig | None = None,
    ) -> None:
        self.sessionizer = sessionizer
        self.partition_of = Partitioner(partitions)
        self.store = store
        self.output = output
        self.topics = topics
        self.redis = redis
        # Redis values of a deferred flush, held until its changelog is delivered.
        self.mirror_pending: dict[str, bytes | None] = {}
        self.mirror_erased: list[str] = []  # those of its deletions that are erasures
        # Items for other keys' partitions (stitching, erasure cascades), gathered
        # per target partition for a few seconds of stream time at most (_forward).
        self.forward_pending: dict[int, list[Any]] = {}
        self.forward_since = -1  # stream time when the oldest of them was queued
        self.forward_max_delay_ms = sessionizer.config.grace_ms // 30
        self.idle_ms = idle_ms
        self.wall = wall
        self.spikes = spikes or SpikeConfig()
        self.parts: dict[int, PartitionState] = {}
        self.cache: dict[str, CustomerState] = {}
        self.dirty: set[str] = set()
        self.forgotten: set[str] = set()
        self.counts: Counter[str] = Counter()
        # Encoded state size of customers with one open journey, by its touchpoints kept.
        self.state_sizes: dict[int, list[int]] = {}  # touchpoints -> [states, bytes]
        self._zero_metrics()

    def _zero_metrics(self) -> None:
        """Create the series of known label values at 0.

        Prometheus sees a counter's first increase only if it scraped the
        series before: one born at 5 reads as "no change" to rate().
        """
        for outcome in OUTCOMES:
            metrics.JOURNEYS_COMPLETED.labels(outcome)
        for stage in ("none", *STAGES):
            metrics.JOURNEY_FURTHEST_STAGE.labels(stage)
        for status in ("purchased", "abandoned"):
            metrics.JOURNEY_CARTS.labels(status)
        rules = self.sessionizer.rules
        for channel in CHANNELS:
            metrics.EVENTS_LATE.labels(channel)
            for rule in rules.by_name if rules is not None else ():
                metrics.FRICTION_SIGNALS.labels(rule, channel)

    # ------------------------------------------------------------ partitions
    def load_partition(self, partition: int) -> PartitionState:
        """Take over ``partition``: its stream clock and the deadlines of its stored states."""
        meta_raw = self.store.get(META_PREFIX + str(partition).encode(), partition)
        meta = msgspec.msgpack.decode(meta_raw, type=_Meta) if meta_raw else _Meta(0, 0)
        clock = StreamClock(self.idle_ms, self.wall, meta.watermark)
        clock.now()  # floor starts at the watermark
        counter = WindowCounter(self.spikes.window_ms)
        counter.load(meta.counts)
        part = PartitionState(
            clock,
            counter,
            persisted_watermark=meta.watermark,
            persisted_floor=meta.floor,
            applied=meta.applied,
            persisted_applied=meta.applied,
            replay_through=meta.applied,
        )
        self.parts[partition] = part
        loaded = 0
        for raw_key, raw in self.store.scan(partition):
            if raw_key.startswith(META_PREFIX):
                continue
            loaded += 1
            view = _expiry_view.decode(raw)
            if bytes(view.journeys) == _NO_JOURNEYS and bytes(view.rules) == _NO_RULES:
                continue  # nothing to schedule (most stored customers)
            self._schedule(part, decode_state(raw))
        log.info(
            "partition %d: %d stored customers, stream time %s",
            partition,
            loaded,
            iso_ms(clock.now()),
        )
        return part

    def drop_partition(self, partition: int) -> None:
        """Partition revoked (after a flush): forget its in-memory state."""
        self.parts.pop(partition, None)
        for key in [k for k in self.cache if self.partition_of(k) == partition]:
            del self.cache[key]
            self.dirty.discard(key)

    def _part(self, partition: int) -> PartitionState:
        part = self.parts.get(partition)
        return part if part is not None else self.load_partition(partition)

    # ------------------------------------------------------------ state access
    def state(self, key: str, now: int | None = None) -> CustomerState:
        """The key's state, cached; a stored state expired at stream time ``now`` reads as new."""
        state = self.cache.get(key)
        if state is None:
            raw = (
                None
                if key in self.forgotten
                else self.store.get(key.encode(), self.partition_of(key))
            )
            state = decode_state(raw) if raw is not None else None
            if state is None or (now is not None and self.sessionizer.expired(state, now)):
                state = CustomerState(key)  # a stored one is overwritten at the next flush
            self.cache[key] = state
        return state

    def peek(self, key: str) -> CustomerState | None:
        """Read without caching (lookups); a stored state past its expiry reads as absent."""
        state = self.cache.get(key)
        if state is not None:
            return state
        if key in self.forgotten:
            return None
        partition = self.partition_of(key)
        raw = self.store.get(key.encode(), partition)
        if raw is None:
            return None
        state = decode_state(raw)
        part = self.parts.get(partition)
        if part is not None and self.sessionizer.expired(state, part.clock.now()):
            return None
        return state

    def _schedule(self, part: PartitionState, state: CustomerState) -> None:
        """Make sure the key's earliest deadline is on the partition's heap.

        Only journey closes and rule deadlines are scheduled: a state that only
        waits for its 30-day expiry takes no memory beyond the store. Such
        states are expired on the stream time when next read (:meth:`state`)
        and removed from the store by the expiry scan (:meth:`expire_stored`),
        so the heap holds the customers with something live, not every
        customer of the last 30 days.

        A key keeps its entry while the new deadline is not earlier (an entry
        that pops early is simply rescheduled). Deadlines can move earlier: a
        customer comes back and opens a journey, or a new cart starts a
        shorter absence deadline. Then a new entry is pushed and the old one
        is skipped when it pops (superseded); the heap is rebuilt when such
        stale entries pile up.
        """
        deadline = self.sessionizer.live_deadline(state)
        key = state.key
        if deadline is None:
            part.scheduled.pop(key, None)  # a heap entry left behind is skipped when it pops
            return
        existing = part.scheduled.get(key)
        if existing is not None and existing <= deadline:
            return
        part.scheduled[key] = deadline
        heap = part.heap
        heapq.heappush(heap, (deadline, key))
        if len(heap) > 2 * len(part.scheduled) + 1024:
            part.heap = [(d, k) for k, d in part.scheduled.items()]
            heapq.heapify(part.heap)

    def expire_stored(self, budget: int = 2_000, pause_s: float = 60.0) -> int:
        """Remove stored states whose expiry the stream time has passed; returns how many.

        Walks each partition's store a page of ``budget`` states per call (the
        worker calls it on its sweep timer), starting a new pass at most every
        ``pause_s`` seconds. Removal is a changelog tombstone, a store delete
        and a Redis delete, written by the next flush like any other change.
        A state read before the scan reaches it is expired on read instead
        (:meth:`state`), so the outcome depends on stream time only, not on
        when the scan passes.
        """
        expired = 0
        wall = self.wall()
        expire_ms = self.sessionizer.config.expire_ms
        for partition, part in self.parts.items():
            if not part.expiry_scanning:
                if wall < part.expiry_next_pass:
                    continue
                part.expiry_scanning, part.expiry_cursor = True, None
            now = part.clock.now()
            page = self.store.page(partition, part.expiry_cursor, budget)
            for raw_key, raw in page:
                if raw_key.startswith(META_PREFIX):
                    continue
                key = raw_key.decode()
                if key in self.cache or key in self.dirty or key in self.forgotten:
                    continue
                view = _expiry_view.decode(raw)
                if view.touched + expire_ms > now or bytes(view.journeys) != _NO_JOURNEYS:
                    continue  # the common case, without decoding the whole state
                if self.sessionizer.expired(decode_state(raw), now):
                    self.forgotten.add(key)
                    self.dirty.add(key)
                    expired += 1
            if len(page) < budget:
                part.expiry_scanning = False
                part.expiry_next_pass = wall + pause_s
            else:
                part.expiry_cursor = page[-1][0]
        self.counts["expired"] += expired
        return expired

    # ------------------------------------------------------------ bundles
    def missing(self, partition: int, offset: int) -> range:
        """Bundles before ``offset`` that this partition has not applied (normally none).

        The bundle topic is written without transactions and never
        compacted, so its offsets follow each other, and a consumer that
        delivers bundle ``offset`` must have delivered every bundle after
        the last one applied (the partition's ``applied``, restored from the
        meta record on takeover: a crash or a rebalance starts reading at or
        before the one after it, since offsets are committed only after the
        flush that persisted them). A range here means the consumer skipped
        bundles: Faust can, around a rebalance, when a prefetched batch of
        the previous generation moves its read position past the committed
        offset it then seeks back to (records below the read position are
        dropped, and records it counted as a gap are treated as acked), and
        it acks messages it skips as stale, so their offsets can be committed
        unhandled. The shell reads the range straight from Kafka and applies
        it first, so no event is lost to it: before the next bundle
        (JourneyStage.consume) or, with ``offset`` the group's committed
        offset, from the sweep timer.
        """
        applied = self._part(partition).applied
        if applied < 0 or offset <= applied + 1:
            return range(0)
        return range(applied + 1, offset)

    def pass_over(self, partition: int, offsets: range) -> None:
        """Count ``offsets`` as applied (read again and applied, or gone for good)."""
        part = self._part(partition)
        if offsets and offsets.stop - 1 > part.applied:
            part.applied = offsets.stop - 1
            part.meta_dirty = True

    def handle(self, partition: int, offset: int, value: bytes) -> int:
        """Apply one bundle message; returns the number of touchpoints in it."""
        part = self._part(partition)
        if offset > part.applied:
            part.applied = offset
            part.meta_dirty = True
        try:
            bundle = decode_bundle(value)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            self._corrupt(partition, offset, value, exc)
            return 0
        now = part.clock.now()
        # A bundle at or below ``replay_through`` was applied and persisted
        # before this partition was taken over (a crash or rebalance since its
        # last commit). Every key it holds got a state with its ``pos``; a key
        # with no state now lost it to erasure or expiry after that bundle, so
        # re-applying it would bring an erased customer back (lookups, Redis,
        # outputs) until the replayed erasure removed it again.
        replay = offset <= part.replay_through
        fx = Effects()
        sessionizer = self.sessionizer
        fresh: set[str] = set()
        skipped: set[str] = set()
        applied: dict[tuple[str, str], int] = {}
        max_ts = 0
        touchpoints = 0
        for item in bundle.items:
            kind = item.__class__
            # ``kind is X`` does not narrow ``item`` for mypy; an isinstance()
            # per item would cost time, hence the ignores below.
            if kind is Touchpoint:
                key = item.key  # type: ignore[union-attr]
                touchpoints += 1
                counted = (item.event.channel, item.event.event_type)  # type: ignore[union-attr]
                applied[counted] = applied.get(counted, 0) + 1
                # Stream time sees every touchpoint, also those of keys that
                # skip a replayed bundle: a replay keeps the original times.
                if item.ts > max_ts:  # type: ignore[union-attr]
                    max_ts = item.ts  # type: ignore[union-attr]
                    if max_ts > now:
                        now = max_ts
            elif kind is Link:
                key = item.anonymous_id  # type: ignore[union-attr]
            elif kind is Merge:
                key = item.customer_id  # type: ignore[union-attr]
            else:
                key = item.key  # type: ignore[union-attr]
            if key in skipped:
                continue
            state = self.cache.get(key)
            if state is None:
                state = self.state(key, now)
                if replay and state.pos < 0 and key not in fresh:
                    del self.cache[key]  # no state: erased or expired since
                    skipped.add(key)
                    continue
            if key not in fresh:
                if state.pos >= offset:
                    skipped.add(key)  # applied before a crash: exactly once
                    continue
                fresh.add(key)
                state.pos = offset
            if kind is Touchpoint:
                sessionizer.apply(state, item, now, fx)  # type: ignore[arg-type]
            elif kind is Link:
                sessionizer.link(state, item.customer_id, item.event_id, item.ts, fx)  # type: ignore[union-attr]
            elif kind is Merge:
                sessionizer.merge(state, item, now, fx)  # type: ignore[arg-type]
            else:
                self._forget(state, item, fx)  # type: ignore[arg-type]
        # Once per customer touched by the bundle (a deadline can move earlier).
        cache = self.cache
        for key in fresh:
            cached = cache.get(key)
            if cached is not None:
                self._schedule(part, cached)
        if max_ts:
            part.clock.observe(max_ts)
            part.meta_dirty = True
            metrics.child(metrics.PROCESSING_LAG, str(partition)).set(
                max(0.0, self.wall() - max_ts / 1000)
            )
        self._emit(fx, part)
        self._sweep(part)  # deadlines the stream time has now passed, in stream order
        if skipped:
            self.counts["skipped_replayed_keys"] += len(skipped)
        for (channel, etype), n in applied.items():
            metrics.child(metrics.EVENTS_APPLIED, channel, etype).inc(n)
        return touchpoints

    def _forget(self, state: CustomerState, item: Forget, fx: Effects) -> None:
        key = state.key
        if item.cascade:
            for anonymous_id in state.anonymous_ids:
                fx.forwards.append((anonymous_id, Forget(anonymous_id, cascade=False)))
        self.cache.pop(key, None)
        self.forgotten.add(key)
        self.dirty.add(key)
        fx.touched.pop(key, None)
        self.counts["forgotten"] += 1

    def _corrupt(self, partition: int, offset: int, value: bytes, exc: Exception) -> None:
        record = deadletter.dead_letter(
            Rejection("processing_error", f"corrupt bundle: {exc}"),
            payload=value,
            topic=self.topics.validated,
            partition=partition,
            offset=offset,
            stage="journeys",
            now_ms=int(self.wall() * 1000),
        )
        self.output.record(self.topics.deadletter, f"bundle-{partition}", deadletter.encode(record))
        log.error(
            "corrupt bundle at %s[%d]@%d dead-lettered", self.topics.validated, partition, offset
        )

    # ------------------------------------------------------------ effects
    def _emit(self, fx: Effects, part: PartitionState | None) -> None:
        output = self.output
        topics = self.topics
        for at, signal in fx.signals:
            customer = signal["customer_id"]
            output.record(topics.friction, customer, jsonio.dumps(signal))
            metrics.child(metrics.FRICTION_SIGNALS, signal["rule"], signal["channel"]).inc()
            if part is not None:
                part.counter.add(
                    at, signal["rule"], signal["channel"], customer, signal["signal_id"]
                )
                part.meta_dirty = True
        self.counts["signals"] += len(fx.signals)
        if fx.closed:
            # Counted per call, not per journey: one metrics call per label value.
            outcomes: Counter[str] = Counter()
            furthest: Counter[str] = Counter()
            carts: Counter[str] = Counter()
            for summary in fx.closed:
                output.record(topics.journeys, summary["customer_id"], jsonio.dumps(summary))
                outcomes[summary["outcome"]] += 1
                furthest[summary["stage_furthest"] or "none"] += 1
                carts[summary["cart"]["status"]] += 1
                metrics.JOURNEY_DURATION.observe(summary["duration_ms"] / 1000)
                metrics.JOURNEY_LENGTH.observe(summary["touchpoint_count"])
            for outcome, n in outcomes.items():
                metrics.child(metrics.JOURNEYS_COMPLETED, outcome).inc(n)
            for stage, n in furthest.items():
                metrics.child(metrics.JOURNEY_FURTHEST_STAGE, stage).inc(n)
            for status, n in carts.items():
                if status != "none":
                    metrics.child(metrics.JOURNEY_CARTS, status).inc(n)
        for (survey, channel, score), n in fx.surveys.items():
            metrics.child(metrics.SURVEY_RESPONSES, survey, channel, str(score)).inc(n)
        for late in fx.late:
            tp = late.touchpoint
            output.record(topics.late, tp.key, jsonio.dumps(self._late_record(late)))
            metrics.child(metrics.EVENTS_LATE, tp.event.channel).inc()
        if fx.forwards or self.forward_pending:
            self._forward(fx.forwards, part)
        if fx.duplicates:
            metrics.EVENTS_DUPLICATE.inc(fx.duplicates)
        for (before, after), n in fx.transitions.items():
            metrics.child(
                metrics.STAGE_TRANSITIONS, STAGES[before] if before >= 0 else "none", STAGES[after]
            ).inc(n)
        self.counts["closed"] += len(fx.closed)
        self.counts["late"] += len(fx.late)
        self.counts["duplicates"] += fx.duplicates
        self.dirty.update(fx.touched)

    def _forward(self, forwards: list[tuple[str, Any]], part: PartitionState | None) -> None:
        """Queue items for other keys' partitions, sent as one bundle per partition.

        Most ingest bundles make forwards for several partitions (a link to
        an anonymous id's partition, an identified visitor's anonymous event
        to its customer's), a few items each. Sent per handled bundle, they
        were ~3.6 bundle messages per ingest bundle (1,500 of the worker's
        1,900 messages in the 200k-event benchmark), each paying Faust's
        per-message cost and the per-bundle work of :meth:`handle`.

        The queues go out together once the stream time of a handled bundle
        is :attr:`forward_max_delay_ms` past the moment the oldest queued item
        was queued, at :data:`FORWARD_BUNDLE_MAX` items for one partition,
        and with every flush (before the changelog that claims the bundles
        they came from, so a crash replays them as before). The delay is
        bounded in stream time, not only by the flush, because a worker
        working through a backlog moves stream time fast: holding forwards
        for a whole flush (~20k events) made some of them late at their
        target in ``bench_core``. A thirtieth of the grace period (10 s by
        default) kept them on time there; live, the flush interval (1 s)
        comes first.
        """
        pending = self.forward_pending
        now = part.clock.now() if part is not None else None
        if forwards:
            if not pending:
                self.forward_since = now if now is not None else -1
            partition_of = self.partition_of
            for target, item in forwards:
                partition = partition_of(target)
                items = pending.get(partition)
                if items is None:
                    items = pending[partition] = []
                items.append(item)
                if len(items) >= FORWARD_BUNDLE_MAX:
                    del pending[partition]
                    self.output.bundle(partition, items, int(self.wall() * 1000))
        if pending and (now is None or now - self.forward_since >= self.forward_max_delay_ms):
            self._send_forwards()

    def _send_forwards(self) -> None:
        pending, self.forward_pending = self.forward_pending, {}
        now_ms = int(self.wall() * 1000)
        for partition, items in pending.items():
            self.output.bundle(partition, items, now_ms)

    def _late_record(self, late: Any) -> dict[str, Any]:
        tp = late.touchpoint
        source = tp.event
        event: dict[str, Any] = {
            "event_id": source.event_id,
            "event_type": source.event_type,
            "channel": source.channel,
            "occurred_at": iso_ms(tp.ts),
            "properties": properties_of(source),
        }
        for name in ("customer_id", "anonymous_id", "session_hint"):
            value = getattr(source, name)
            if value is not None:
                event[name] = value
        return {
            "schema": LATE_EVENT,
            "key": tp.key,
            "reason": "beyond_grace",
            "event": event,
            "watermark": iso_ms(late.watermark),
            "lateness_ms": late.lateness_ms,
            "detected_at": iso_ms(int(self.wall() * 1000)),
        }

    # ------------------------------------------------------------ time
    def sweep(self) -> int:
        """Close journeys, fire rule deadlines and expire states that stream time has passed.

        Runs per partition after every bundle (deadlines fire in stream order,
        so a replay fires them at the same stream positions as live) and on a
        wall-clock timer (quiet partitions, whose stream time follows the wall
        clock after a while).
        """
        return sum(self._sweep(part) for part in self.parts.values())

    def _sweep(self, part: PartitionState) -> int:
        now = part.clock.now()
        if not part.heap or part.heap[0][0] > now:
            return 0
        fx = Effects()
        due = 0
        # part.heap, not a local: _schedule may rebuild it.
        while part.heap and part.heap[0][0] <= now:
            deadline, key = heapq.heappop(part.heap)
            if part.scheduled.get(key) != deadline:
                continue  # superseded by an earlier deadline
            del part.scheduled[key]
            state = self.state(key)
            due += 1
            self.sessionizer.close_due(state, now, fx)
            if state.journeys or state.rules:
                self._schedule(part, state)
            elif self.sessionizer.expired(state, now):
                self.cache.pop(key, None)
                self.forgotten.add(key)
                self.dirty.add(key)
                fx.touched.pop(key, None)
                self.counts["expired"] += 1
            else:
                self._schedule(part, state)
                if key not in fx.touched and key not in self.dirty:
                    del self.cache[key]  # loaded only to check; nothing changed
        part.meta_dirty = True
        self._emit(fx, part)
        return due

    # ------------------------------------------------------------ write-behind
    def flush(self, deferred: list[tuple[int, bytes, bytes | None]] | None = None) -> int:
        """Write changed states to the changelog/store and Redis; returns records written.

        The caller must then wait for ``output.flush()`` before acking input.
        With ``deferred``, changelog records are appended to it instead of
        sent; the shell sends them (:meth:`write_changelog`) only after the
        outputs recorded so far are delivered. A state in the changelog claims
        (by its ``pos``) every bundle applied to it, so a crash between the
        two deliveries must never leave a state whose outputs (closed
        journeys, signals, late events, forwarded stitching items) are lost:
        a restarted worker would skip those bundles and never emit them again.

        Redis follows the same rule: with ``deferred`` its updates are held
        until the shell calls :meth:`publish_mirror` after the changelog is
        delivered, so other services never read a journey (or miss an erased
        customer) that a crash could still roll back. Without ``deferred``
        (tests, tools) they are submitted at once.
        """
        self._send_forwards()
        output = self.output
        changelog = output.changelog if deferred is None else _appender(deferred)
        store = self.store
        partition_of = self.partition_of
        redis_updates: dict[str, bytes | None] = {}
        erased: list[str] = []
        written = 0
        state_bytes = 0
        # The meta record of a partition (stream time, signal counts, offset of
        # the last bundle applied) goes out twice, on the changelog partition of
        # its states, whose order the idempotent producer keeps: before the
        # states with the new counts but the stream time and offset already
        # persisted, after them with all new. If a crash cuts the flush short,
        # every delivered state has its signals in the delivered counts (the
        # bundles re-applied after it emit them again, same ids, and
        # WindowCounter counts an id once), stream time is never ahead of the
        # states (re-applied events are not made late), and the offset never
        # claims a bundle whose states were not delivered.
        finals: list[tuple[int, bytes, bytes]] = []
        for partition, part in self.parts.items():
            now = part.clock.now()
            # Report counts and stream time every flush: quiet partitions still
            # move the alerting stage's windows on.
            output.record(
                self.topics.signal_counts,
                str(partition),
                _partial_encoder.encode(part.counter.partial(partition, now)),
            )
            part.counter.prune(now, self.spikes.lateness_ms)
            if part.meta_dirty:
                counts = part.counter.dump()
                meta_key = META_PREFIX + str(partition).encode()
                early = _Meta(
                    part.persisted_watermark, part.persisted_floor, counts, part.persisted_applied
                )
                changelog(partition, meta_key, msgspec.msgpack.encode(early))
                meta = msgspec.msgpack.encode(
                    _Meta(part.clock.watermark, now, counts, part.applied)
                )
                finals.append((partition, meta_key, meta))
                part.persisted_watermark, part.persisted_floor = part.clock.watermark, now
                part.persisted_applied = part.applied
                part.meta_dirty = False
                written += 2
                metrics.STREAM_TIME.labels(str(partition)).set(now / 1000)
        for key in self.dirty:
            raw_key = key.encode()
            partition = partition_of(key)
            if key in self.forgotten and key not in self.cache:
                changelog(partition, raw_key, None)
                store.delete(raw_key, partition)
                redis_updates[key] = None
                erased.append(key)
                written += 1
                continue
            state = self.cache.get(key)
            if state is None:
                continue
            data = encode_state(state)
            changelog(partition, raw_key, data)
            store.put(raw_key, partition, data)
            state_bytes += len(data)
            if len(state.journeys) == 1:
                size = self.state_sizes.setdefault(len(state.journeys[0].tps), [0, 0])
                size[0] += 1
                size[1] += len(data)
            redis_updates[key] = self.redis_value(state)
            written += 1
            if not state.journeys:
                del self.cache[key]  # nothing live: the store copy is enough
        for partition, meta_key, meta in finals:
            changelog(partition, meta_key, meta)
            store.put(meta_key, partition, meta)
        self.forgotten.clear()
        self.dirty.clear()
        store.commit()
        if self.redis is not None and redis_updates:
            if deferred is None:
                self.redis.submit(redis_updates, erased=erased)
            else:
                self.mirror_pending.update(redis_updates)
                self.mirror_erased.extend(erased)
        metrics.CHANGELOG_RECORDS.inc(written)
        metrics.STATE_BYTES.inc(state_bytes)
        self.counts["changelog_records"] += written
        return written

    def publish_mirror(self) -> None:
        """Send Redis the updates of deferred flushes, once their changelog is delivered."""
        if self.redis is not None and self.mirror_pending:
            pending, self.mirror_pending = self.mirror_pending, {}
            erased, self.mirror_erased = self.mirror_erased, []
            self.redis.submit(pending, erased=erased)

    def write_changelog(self, writes: list[tuple[int, bytes, bytes | None]]) -> None:
        """Send changelog records deferred by :meth:`flush`, in order."""
        changelog = self.output.changelog
        for partition, key, value in writes:
            changelog(partition, key, value)

    def redis_value(self, state: CustomerState) -> bytes | None:
        """The Redis mirror of a customer's live journey (None: no live journey, delete).

        Built for every changed customer at every flush, so it is compact: the
        latest :data:`REDIS_TOUCHPOINTS` touchpoints as arrays
        ``[epoch_ms, event_id, event_type, channel, stage_index]`` and channels
        as ``{channel: [touchpoints, first_epoch_ms]}``, straight from state
        (no per-touchpoint formatting). The HTTP lookup has the full
        view with RFC 3339 times and stage names.
        """
        if not state.journeys:
            return None
        j = state.journeys[-1]
        cart = j.cart
        return jsonio.dumps(
            {
                "customer_id": state.key,
                "journey_id": j.id,
                "open_journeys": len(state.journeys),
                "started_at_ms": j.start,
                "last_event_at_ms": j.last,
                "touchpoint_count": j.count,
                "channels": j.channels,
                "stage_current": j.last_staged[2] if j.last_staged else -1,
                "stage_furthest": j.furthest,
                # round() of a float costs ~0.2 us; most journeys have no cart
                # value or revenue, and 0.0 needs no rounding.
                "cart": [
                    cart.status(),
                    max(cart.items, 0),
                    round(cart.value, 2) if cart.value else 0.0,
                ],
                "orders": [j.orders, round(j.revenue, 2) if j.revenue else 0.0],
                "friction": j.friction,
                "identified": j.identified,
                "anonymous_ids": j.anonymous_ids,
                "touchpoints": j.tps[-REDIS_TOUCHPOINTS:],
            }
        )

    def resync_redis(self) -> None:
        """Re-send every live journey to Redis (after the sink dropped updates).

        Only durable state: a key changed since the last flush began (``dirty``)
        is left to the next flush, which mirrors it once its changelog is
        delivered, as :meth:`publish_mirror` does for every other update.
        """
        if self.redis is not None:
            dirty = self.dirty
            self.redis.submit(
                {key: self.redis_value(s) for key, s in self.cache.items() if key not in dirty},
                resync=True,
            )

    def active_by_stage(self) -> Counter[str]:
        counts: Counter[str] = Counter()
        for state in self.cache.values():
            for journey in state.journeys:
                stage = journey.last_staged[2] if journey.last_staged else -1
                counts[STAGES[stage] if stage >= 0 else "none"] += 1
        return counts

    # ------------------------------------------------------------ lookups
    def lookup(self, key: str) -> dict[str, Any] | None:
        """A customer's live journeys and recent history, or None if nothing is kept."""
        state = self.peek(key)
        if state is None:
            return None
        return {
            "customer_id": key,
            "alias_of": state.alias_of,
            "anonymous_ids": state.anonymous_ids,
            "live": [journey_view(j, iso_ms) for j in state.journeys],
            "recent": [
                {
                    "journey_id": r.id,
                    "started_at": iso_ms(r.start),
                    "last_event_at": iso_ms(r.last),
                    "outcome": r.outcome,
                    "touchpoint_count": r.count,
                    "channels": r.channels,
                }
                for r in reversed(state.recent)
            ],
            "late_events": state.late,
        }
