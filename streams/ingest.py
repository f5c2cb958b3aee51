"""Ingest: raw per-source topics -> validated, customer-keyed bundle stream + dead letters.

:class:`Ingestor` is the transform (no I/O): a batch of raw messages in, bundles
per validated partition and dead letters out. :class:`IngestWorker` is the thin
confluent-kafka shell around it: consume a batch, transform, produce, wait for
delivery, commit. Delivery is at-least-once: a crash between produce and
commit re-reads the batch, and the journey stage drops the duplicates by
``event_id``. If output cannot be delivered the batch is re-read, never skipped.

Plain confluent-kafka instead of Faust here: raw topics carry one event per
message, and Faust's per-message cost (~165 us) would cap ingest at ~6k/s.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from operator import countOf, itemgetter
from typing import Any, Protocol

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from msgspec import UNSET, Raw

from schemas.decoder import (
    REASONS,
    EventDecoder,
    Rejected,
    Rejection,
    _heads,
    _tails,
    parse_rfc3339,
)
from sinks import deadletter
from streams.bundles import Link, Partitioner, encode_bundle
from streams.core.alignment import Aligner, Held
from streams.core.stages import STAGE_BY_TYPE, stage_of
from touchpoint import metrics
from touchpoint.config import IngestSettings, KafkaSettings, TopicSettings
from touchpoint.producer import StallWatch, broker_health, retire
from touchpoint.topics import ensure_topics, partition_count

log = logging.getLogger(__name__)

_ITEM = itemgetter(3)
_PURGED = (KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT)


class RawMessage(Protocol):
    """What the transform needs from a message (confluent_kafka.Message fits)."""

    def topic(self) -> str | None: ...
    def partition(self) -> int | None: ...
    def offset(self) -> int | None: ...
    def key(self) -> bytes | None: ...
    def value(self) -> bytes | None: ...
    def timestamp(self) -> tuple[int, int]: ...


class MemoryMessage:
    """A :class:`RawMessage` held in memory (in-process pipelines: tests, bench_core)."""

    __slots__ = ("_offset", "_topic", "_value")

    def __init__(self, value: bytes, topic: str, offset: int) -> None:
        self._value, self._topic, self._offset = value, topic, offset

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


@dataclass(slots=True)
class IngestResult:
    """Output of one batch: bundle items per partition, dead letters and counts."""

    # (topic, partition) -> [(event time, offset, target partition, bundle item)]
    entries: dict[tuple[str, int], list[Held]] = field(default_factory=dict)
    dead: list[tuple[bytes | None, bytes]] = field(default_factory=list)
    # (channel, event type) -> accepted events
    accepted: dict[tuple[str, str], int] = field(default_factory=dict)
    rejected: dict[tuple[str, str], int] = field(default_factory=lambda: defaultdict(int))
    max_event_ms: int = 0
    # (topic, partition) -> newest event time read (-1: only refused inputs)
    progress: dict[tuple[str, int], int] = field(default_factory=dict)
    # (topic, partition) -> offset after the last message of the batch
    next_offsets: dict[tuple[str, int], int] = field(default_factory=dict)

    @property
    def events(self) -> int:
        return sum(self.accepted.values())

    @property
    def bundles(self) -> dict[int, list[Any]]:
        """All items by target partition (no alignment: tests and tools)."""
        return by_target([e for entries in self.entries.values() for e in entries])


def by_target(entries: list[Held]) -> dict[int, list[Any]]:
    """Group held entries into bundle items per target partition, keeping their order."""
    out: dict[int, list[Any]] = {}
    for _ts, _offset, target, item in entries:
        items = out.get(target)
        if items is None:
            items = out[target] = []
        items.append(item)
    return out


def encoded_bundles(
    entries: list[Held], per_message: int, now_ms: int
) -> Iterator[tuple[int, bytes]]:
    """(target partition, encoded bundle) of held entries, at most ``per_message`` items each."""
    for partition, items in by_target(entries).items():
        for start in range(0, len(items), per_message):
            yield partition, encode_bundle(items[start : start + per_message], now_ms)


class Ingestor:
    """Decode, validate, normalise and route raw messages (pure: no I/O).

    ``source_of`` maps raw topic names to source names (``touchpoints.web`` ->
    ``web``); the source labels the rejection metrics. Each accepted event becomes a
    Touchpoint keyed by customer id, else anonymous id, carrying its event time,
    stage and the validated event bytes as they are (no re-encoding), in the
    bundle of the partition that key hashes to. An ``identify`` event also sends
    a :class:`Link` to the anonymous id's partition.
    """

    def __init__(
        self,
        decoder: EventDecoder,
        partitioner: Partitioner,
        source_of: dict[str, str],
        *,
        deadletter_payload_max_bytes: int = 65_536,
    ) -> None:
        self.decoder = decoder
        self.partitioner = partitioner
        self.source_of = source_of
        self.deadletter_payload_max_bytes = deadletter_payload_max_bytes

    def process(self, messages: Iterable[RawMessage], now_ms: int) -> IngestResult:
        result = IngestResult()
        entries = result.entries
        accepted: dict[tuple[str, str], int] = {}
        decoder = self.decoder
        decode = decoder.fast_decode
        # The common case, inlined (measured ~1.5 us less per event than calling
        # ``decode``): a struct of a "simple" class with an identity and a
        # cached RFC 3339 time within bounds. Anything else takes ``decode``,
        # which gives the same verdict and, for bad input, the rejection.
        struct_decode = decoder.struct_decode
        simple = decoder.simple
        max_bytes = decoder.max_payload_bytes
        min_ms, max_ms = decoder.time_bounds()
        heads, tails = _heads, _tails
        partition_of = self.partitioner
        partition_cache = partition_of.cache.get
        parse_time = parse_rfc3339
        by_type = STAGE_BY_TYPE
        progress = result.progress
        max_ts = 0
        topic: str | None = None
        part: int | None = None
        source: tuple[str, int] = ("", -1)
        held: list[Held] = []
        newest = -1
        offset = -1
        next_offsets = result.next_offsets
        # The hot loop: locals only, as few calls per event as possible (measured).
        # Per-source figures (next offset, newest event time) are kept in locals
        # and stored when the source changes (confluent-kafka hands out runs of
        # one partition) and once at the end.
        for message in messages:
            value = message.value() or b""
            if message.partition() != part or message.topic() != topic:
                if offset >= 0:
                    next_offsets[source] = offset + 1
                    if newest > progress[source]:
                        progress[source] = newest
                topic, part = message.topic(), message.partition()
                source = (topic, part)  # type: ignore[assignment]
                held = entries.get(source)  # type: ignore[assignment]
                if held is None:
                    held = entries[source] = []
                    progress[source] = -1
                newest = progress[source]
            offset = message.offset()  # type: ignore[assignment]
            try:
                event = None
                if len(value) <= max_bytes:
                    try:
                        event = struct_decode(value)
                    except Exception:
                        event = None
                if event is not None and event.__class__ in simple:
                    cid = event.customer_id
                    key = event.anonymous_id if cid is UNSET else cid
                    occurred = event.occurred_at
                    if occurred.__class__ is str:
                        head = heads.get(occurred[:19])
                        tail = tails.get(occurred[19:]) if head is not None else None
                        if tail is not None:
                            ts = head + tail  # type: ignore[operator]
                        else:  # not cached yet (a new second): parse, which caches it
                            ts = parse_time(occurred)  # type: ignore[assignment]
                            if ts is None:
                                ts = -1
                    else:
                        ts = occurred
                    if key is UNSET or ts < min_ms or ts > max_ms:
                        event, ts = decode(value)  # the full path: rejects or accepts
                        cid = event.customer_id
                        key = event.anonymous_id if cid is UNSET else cid
                else:
                    event, ts = decode(value)
                    cid = event.customer_id
                    key = event.anonymous_id if cid is UNSET else cid
                partition = partition_cache(key)
                if partition is None:
                    partition = partition_of(key)
                etype = event.event_type
                stage = by_type.get(etype)
                if stage is None:
                    stage = stage_of(etype, event.properties)
                held.append((ts, offset, partition, ("t", ts, key, stage, Raw(value))))
                if etype == "identify":
                    aid = event.anonymous_id
                    held.append((ts, offset, partition_of(aid), Link(aid, cid, ts, event.event_id)))
                counted = (event.channel, etype)
                accepted[counted] = accepted.get(counted, 0) + 1
                if ts > newest:
                    newest = ts
                    if ts > max_ts:
                        max_ts = ts
            except Rejected as exc:
                self._reject(result, message, exc.rejection, now_ms)
            except Exception as exc:  # never let one input kill ingest
                log.exception("unexpected error ingesting %s", message.topic())
                self._reject(
                    result,
                    message,
                    Rejection("processing_error", f"{type(exc).__name__}: {exc}"),
                    now_ms,
                )
        if offset >= 0:
            next_offsets[source] = offset + 1
            if newest > progress[source]:
                progress[source] = newest
        result.max_event_ms = max_ts
        result.accepted = accepted
        return result

    def _reject(
        self, result: IngestResult, message: RawMessage, rejection: Rejection, now_ms: int
    ) -> None:
        topic = message.topic() or ""
        ts_type, ts = message.timestamp()
        key = message.key()
        record = deadletter.dead_letter(
            rejection,
            payload=message.value() or b"",
            topic=topic,
            partition=message.partition() or 0,
            offset=message.offset() or 0,
            timestamp_ms=ts if ts_type else -1,
            key=key,
            max_payload_bytes=self.deadletter_payload_max_bytes,
            now_ms=now_ms,
        )
        result.dead.append((key, deadletter.encode(record)))
        result.rejected[(self.source_of.get(topic, topic), rejection.reason)] += 1


@dataclass(slots=True)
class _InFlight:
    """A batch whose output is on its way: positions to commit once ``pending`` reaches 0."""

    positions: list[TopicPartition]
    pending: int = 0
    failed: bool = False


class IngestWorker:
    """The confluent-kafka loop around :class:`Ingestor`."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        settings: IngestSettings,
        *,
        clock: Callable[[], float] = time.time,
        create_topics: bool = True,
    ) -> None:
        self.kafka = kafka
        self.topics = topics
        self.settings = settings
        self.clock = clock
        if create_topics:
            ensure_topics(kafka, topics)
        self._producer_config = {
            "error_cb": self._on_producer_error,
            **kafka.librdkafka(),
            **broker_health(kafka, "ingest_producer"),
            "enable.idempotence": True,
            "linger.ms": 5,
            "batch.size": 1_000_000,
            "queue.buffering.max.messages": 500_000,
        }
        self.producer = Producer(self._producer_config)
        self._watch = StallWatch()
        self._stop = threading.Event()
        partitions = partition_count(self.producer, topics.validated)
        # Every (source, reason) series exists from the start at 0, so the first
        # dead letters show as an increase (see JourneyProcessor._zero_metrics).
        for source in topics.sources:
            for reason in REASONS:
                metrics.EVENTS_REJECTED.labels(source, reason)
        self.ingestor = Ingestor(
            EventDecoder(
                max_payload_bytes=settings.max_payload_bytes,
                min_event_time_ms=settings.min_event_time_ms,
                max_future_skew_s=settings.max_future_skew_s,
                clock=clock,
            ),
            Partitioner(partitions),
            {topics.raw(source): source for source in topics.sources},
            deadletter_payload_max_bytes=settings.deadletter_payload_max_bytes,
        )
        # No enable.partition.eof: with it, librdkafka's batch consume returns
        # at every partition-end event, which cut consume throughput ~4x
        # (measured 150k vs 560k+ msgs/s). Ends are found from the cached high
        # watermarks instead (:meth:`_mark_ends`), which cost no broker call.
        self.consumer = Consumer(
            {
                **kafka.librdkafka_consumer(settings.group_id),
                **broker_health(kafka, "ingest_consumer"),
            }
        )
        self.aligner = Aligner(
            int(settings.align_skew_s * 1000),
            settings.align_max_wait_s,
            max_backlog_wait_s=settings.align_max_backlog_wait_s,
        )
        self.consumer.subscribe(
            list(topics.raw_topics), on_assign=self._on_assign, on_revoke=self._on_revoke
        )
        self._inflight: deque[_InFlight] = deque()
        self.max_in_flight = 2
        self._paused: set[tuple[str, int]] = set()
        # Next offset to read per assigned partition (committed offset until a message is read).
        self._next: dict[tuple[str, int], int] = {}
        self.released_total = 0
        self.events_total = 0
        self.rejected_total = 0
        self.by_channel: Counter[str] = Counter()
        self.by_reason: Counter[str] = Counter()
        self._lag_reported_at = 0.0

    def _produce(self, topic: str, value: bytes, batch: _InFlight, **kwargs: Any) -> None:
        watch = self._watch

        def delivered(err: KafkaError | None, _msg: Message) -> None:
            batch.pending -= 1
            if err is None:
                watch.progress()
            else:
                batch.failed = True
                if err.code() not in _PURGED:
                    log.error("delivery failed: %s", err)

        batch.pending += 1
        while True:
            try:
                self.producer.produce(topic, value, on_delivery=delivered, **kwargs)
                return
            except BufferError:
                self.producer.poll(0.05)
                self._check_stall()
            except KafkaException as exc:  # fatal: this producer takes nothing more
                log.error("ingest producer refused a message (%s): new producer", exc)
                batch.pending -= 1
                batch.failed = True  # the batch is re-read from the last commit
                self._new_producer()
                return

    def _on_producer_error(self, err: KafkaError) -> None:
        # Without this callback confluent-kafka raises fatal errors (e.g. a
        # sequence desynchronisation after a broker lost its state) out of
        # poll/flush, killing the loop. A fatal error fails every message
        # held, so their batches take the re-read path and get a new producer.
        if err.fatal():
            log.error("ingest producer fatal error (batches re-read, new producer): %s", err)
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("ingest producer: %s", err)  # once per outage; librdkafka logs the rest

    def _check_stall(self) -> None:
        if self._watch.stalled(self.producer):
            log.warning(
                "ingest output delivered nothing for %.0f s while the broker answers "
                "(it may have lost this producer's id in a restart): new producer",
                self._watch.after_s,
            )
            self._new_producer()

    def _new_producer(self) -> None:
        """Drop what the producer holds (its batches re-read from the last commit) and replace it."""
        retire(self.producer, "ingest producer")  # the purge reports mark their batches failed
        self.producer = Producer(self._producer_config)
        self._watch.progress()

    def run_once(self, timeout: float | None = None) -> int:
        """Process one batch; returns the number of messages read.

        Output is not waited for here: the next batch is processed while the
        broker acknowledges this one, and :meth:`_settle` commits each batch's
        positions once all of its output is delivered, in order.
        """
        settings = self.settings
        messages = self.consumer.consume(
            settings.batch_size, settings.batch_timeout_s if timeout is None else timeout
        )
        if not messages:
            self._mark_ends()
            self._emit(int(self.clock() * 1000))
            self._report_lag()
            return 0
        started = time.perf_counter()
        data = [message for message in messages if message.error() is None]
        if len(data) < len(messages):
            for message in messages:
                if message.error() is not None:
                    log.warning("consumer error: %s", message.error())
        now_ms = int(self.clock() * 1000)
        result = self.ingestor.process(data, now_ms)
        for source, newest in result.progress.items():
            self.aligner.read(source, newest, result.entries.get(source, []))
        self._next.update(result.next_offsets)
        self._mark_ends()
        bundles = self._emit(now_ms, result.dead)
        self._record(result, bundles, time.perf_counter() - started, now_ms)
        self._report_lag()
        return len(messages)

    def _report_lag(self, every_s: float = 1.0) -> None:
        """Consumer lag per raw partition, at most once per ``every_s``.

        High watermark cached by librdkafka from its latest fetch (no broker
        round trip) minus the next offset to read. A partition paused by
        alignment fetches nothing, so its watermark (and lag) is the one from
        before the pause.
        """
        now = time.monotonic()
        if now - self._lag_reported_at < every_s:
            return
        self._lag_reported_at = now
        watermarks = self.consumer.get_watermark_offsets
        group = self.settings.group_id
        for (topic, partition), next_offset in self._next.items():
            try:
                _low, high = watermarks(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                metrics.CONSUMER_LAG.labels(group, topic, str(partition)).set(
                    max(0, high - next_offset)
                )

    def _emit(self, now_ms: int, dead: list[tuple[bytes | None, bytes]] = ()) -> int:  # type: ignore[assignment]
        """Send what alignment releases (and dead letters); returns bundles sent."""
        released = self.aligner.release()
        if not released and not dead:
            self._pace()
            self._settle()
            return 0
        batch = _InFlight(self._commit_positions())
        validated = self.topics.validated
        per_message = self.settings.bundle_max_events
        bundles = 0
        for partition, value in encoded_bundles(released, per_message, now_ms):
            self._produce(validated, value, batch, partition=partition)
            bundles += 1
        for key, value in dead:
            self._produce(self.topics.deadletter, value, batch, key=key)
        # Touchpoints released (links are not events); counted in C, not per event in Python.
        self.released_total += len(released) - countOf(map(type, map(_ITEM, released)), Link)
        self._inflight.append(batch)
        self._pace()
        self._settle()
        return bundles

    def _mark_ends(self) -> None:
        """Tell the aligner which partitions have nothing more to read right now.

        A partition is at its end when the next offset to read reaches the high
        watermark librdkafka cached from its latest fetch response (no broker
        round trip); below it, the partition has a backlog, and the aligner
        waits for it up to ``align_max_backlog_wait_s`` instead of
        ``align_max_wait_s``. Unknown watermarks (no fetch answered yet) count
        as neither; ``max_wait_s`` bounds that wait.
        """
        if not self.settings.align_skew_s:
            return
        watermarks = self.consumer.get_watermark_offsets
        aligner = self.aligner
        for source, next_offset in self._next.items():
            try:
                _low, high = watermarks(TopicPartition(*source), cached=True)
            except KafkaException:
                continue
            if high < 0:
                continue
            if next_offset >= high:
                aligner.reached_end(source)
            else:
                aligner.has_backlog(source)

    def _commit_positions(self) -> list[TopicPartition]:
        """Consumed positions, but never past an event still held back by alignment."""
        positions = []
        for tp in self.consumer.position(self.consumer.assignment()):
            held = self.aligner.first_held_offset((tp.topic, tp.partition))
            if held is not None:
                positions.append(TopicPartition(tp.topic, tp.partition, held))
            elif tp.offset >= 0:
                positions.append(tp)
        return positions

    def _pace(self) -> None:
        """Pause partitions holding too many events back; resume them once drained."""
        limit = self.settings.align_max_held
        pause, resume = [], []
        for tp in self.consumer.assignment():
            source = (tp.topic, tp.partition)
            full = self.aligner.held_count(source) >= limit
            if full and source not in self._paused:
                pause.append(tp)
                self._paused.add(source)
            elif not full and source in self._paused:
                resume.append(tp)
                self._paused.discard(source)
        if pause:
            self.consumer.pause(pause)
        if resume:
            self.consumer.resume(resume)
        if pause or resume:
            metrics.INGEST_PAUSED.set(len(self._paused))

    def _settle(self, block: bool = False) -> None:
        """Commit the positions of the oldest batches whose output is fully delivered.

        Waits when more than ``max_in_flight`` batches are outstanding (or when
        ``block``). A failed delivery rewinds to the last commit: the batches
        after it are read again (at-least-once; the journey stage drops the
        duplicates by event id).
        """
        inflight = self._inflight
        self.producer.poll(0)
        if inflight:
            self._check_stall()
        while inflight:
            head = inflight[0]
            if head.failed:
                log.error("could not deliver ingest output; re-reading from the last commit")
                metrics.INGEST_RETRIES.inc()
                # Whatever is still queued is re-read too: drop it rather than
                # wait for it (a producer stuck on a lost id never delivers).
                self._new_producer()
                inflight.clear()
                self._rewind()
                # Held events are re-read from the last commit too.
                self.aligner.assigned(list(self.aligner.last_data))
                return
            if head.pending > 0:
                if not block and len(inflight) <= self.max_in_flight:
                    return
                self.producer.poll(0.05)
                self._check_stall()
                continue
            if head.positions:
                self.consumer.commit(offsets=head.positions, asynchronous=True)
            inflight.popleft()

    def _on_assign(self, consumer: Any, partitions: list[TopicPartition]) -> None:
        self.aligner.assigned([(tp.topic, tp.partition) for tp in partitions])
        try:
            committed = consumer.committed(partitions, timeout=10)
        except KafkaException as exc:
            log.warning("could not read committed offsets: %s", exc)
            committed = partitions
        for tp in committed:
            # Nothing committed yet: reading starts at the beginning (auto.offset.reset).
            self._next[(tp.topic, tp.partition)] = max(tp.offset, 0)
        self._paused.difference_update((tp.topic, tp.partition) for tp in partitions)

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        # Partitions move to another consumer: commit everything processed so far.
        self.producer.flush(30)
        self._settle(block=True)
        self.aligner.revoked([(tp.topic, tp.partition) for tp in partitions])
        for tp in partitions:
            self._next.pop((tp.topic, tp.partition), None)
            # Another consumer reports this partition's lag from now on.
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(self.settings.group_id, tp.topic, str(tp.partition))
        self._paused.difference_update((tp.topic, tp.partition) for tp in partitions)

    def _record(self, result: IngestResult, bundles: int, seconds: float, now_ms: int) -> None:
        for (channel, etype), n in result.accepted.items():
            metrics.EVENTS_IN.labels(channel, etype).inc(n)
            self.by_channel[channel] += n
        for (source, reason), n in result.rejected.items():
            metrics.EVENTS_REJECTED.labels(source, reason).inc(n)
            self.by_reason[reason] += n
        metrics.INGEST_BATCHES.inc()
        metrics.INGEST_BUNDLES.inc(bundles)
        metrics.INGEST_BATCH_SECONDS.observe(seconds)
        if result.max_event_ms:
            metrics.INGEST_EVENT_TIME_LAG.set(max(0.0, (now_ms - result.max_event_ms) / 1000))
        self.events_total += result.events
        self.rejected_total += len(result.dead)

    def _rewind(self) -> None:
        """Seek every assigned partition back to its committed offset.

        Waits for the broker if it is away (logged), unless ingest is stopping.
        """
        assignment = self.consumer.assignment()
        while True:
            try:
                committed = self.consumer.committed(assignment, timeout=10)
                break
            except KafkaException as exc:
                log.warning("cannot read committed offsets to re-read from (%s); retrying", exc)
                if self._stop.wait(1.0):
                    return
        for tp in committed:
            offset = tp.offset if tp.offset >= 0 else OFFSET_BEGINNING
            self.consumer.seek(TopicPartition(tp.topic, tp.partition, offset))

    def run(self, stop: threading.Event | None = None) -> None:
        """Run until ``stop`` is set, then commit and close."""
        stop = self._stop = stop or self._stop
        log.info(
            "ingest: %s -> %s (dead letters: %s)",
            ",".join(self.topics.raw_topics),
            self.topics.validated,
            self.topics.deadletter,
        )
        try:
            while not stop.is_set():
                self.run_once()
        finally:
            self.close()

    def close(self) -> None:
        self.producer.flush(30)
        self._settle(block=True)
        self.consumer.close()
