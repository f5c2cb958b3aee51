"""The Faust worker: the validated bundle stream through the journey stage.

Faust provides the consumer group (partition assignment, rebalances), the
table (changelog topic, recovery into a memory or RocksDB store, standbys) and
the web server with key routing for lookups. The work itself happens in
:class:`streams.journeys.JourneyProcessor`; this module only wires it.

Offsets: the agent reads with ``noack()`` and acks a bundle only after the
flush that persisted its effects (state changelog, outputs) was delivered.
Faust commits acked offsets only, so a crash replays unflushed bundles, and
each state's stored ``pos`` makes the replay exactly-once.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import faust
import msgspec
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sinks.kafka_out import OutputProducer
from sinks.redis_sink import RedisJourneySink
from streams.bundles import Partitioner
from streams.core.rules import RuleEngine, RulesConfig, load_rules
from streams.core.sessionizer import Sessionizer
from streams.core.spikes import ALL_CHANNELS, AlertState, Partial, WindowAggregator
from streams.journeys import META_PREFIX, JourneyProcessor, SortedPages, StateStore
from streams.pacing import FlushPacer, time_idle
from streams.refetch import BundleReader
from streams.watchdog import RecoveryWatch
from touchpoint import jsonio, metrics
from touchpoint.config import CHANNELS, KafkaSettings, Settings

log = logging.getLogger(__name__)

# After a crash, the process exits within this many seconds even if Faust's stop hangs.
CRASH_EXIT_S = 30.0

# RocksDB memory per partition database. Faust's defaults (a 2 GiB block cache
# and 3 x 64 MiB memtables per partition) let a worker's RSS climb by ~1 MiB/s
# for as long as a soak ran, towards GiBs per partition. Live journeys are
# cached in Python, so RocksDB is read only for returning customers.
ROCKSDB_OPTIONS = {
    "block_cache_size": 32 * 2**20,
    "write_buffer_size": 16 * 2**20,
    "max_write_buffer_number": 2,
}


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
            "uordblks", "fordblks", "keepcost",
        )
    ]  # fmt: skip


def _libc(name: str) -> Any:
    """A function of the C library the process runs on (None without glibc's ``name``)."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (AttributeError, OSError):
        return None


def malloc_stats() -> dict[str, float]:
    """glibc's heap (MB): in use, free but kept (fragmentation), mmapped; {} elsewhere."""
    mallinfo2 = _libc("mallinfo2")
    if mallinfo2 is None:
        return {}
    mallinfo2.restype = _MallInfo2
    info = mallinfo2()
    mb = 2**20
    return {
        "in_use_mb": round(info.uordblks / mb, 1),
        "free_mb": round(info.fordblks / mb, 1),
        "mmap_mb": round(info.hblkhd / mb, 1),
    }


def release_free_memory() -> float:
    """Give glibc's free heap memory back to the OS (``malloc_trim``); returns seconds taken.

    A worker frees and allocates states, encodings and Kafka buffers across
    several threads; glibc keeps freed memory in per-thread arenas, where a
    soak saw it settle at ~160 MB of RSS holding nothing. Trimming every
    minute costs a few milliseconds. No-op without glibc.
    """
    trim = _libc("malloc_trim")
    if trim is None:
        return 0.0
    started = time.perf_counter()
    trim(0)
    return time.perf_counter() - started


ROCKSDB_MEMORY = {
    "memtables": "rocksdb.cur-size-all-mem-tables",
    "block_cache": "rocksdb.block-cache-usage",
    "table_readers": "rocksdb.estimate-table-readers-mem",
    "keys": "rocksdb.estimate-num-keys",
}


class MemoryTableStore:
    """StateStore over Faust's in-memory table store (raw bytes keys and values)."""

    def __init__(self, table: Any, partitions: int) -> None:
        self._data: dict[bytes, bytes] = table.data.data
        self._partition_of = Partitioner(partitions)
        self._pages = SortedPages()

    def get(self, key: bytes, partition: int) -> bytes | None:
        return self._data.get(key)

    def put(self, key: bytes, partition: int, value: bytes) -> None:
        self._data[key] = value

    def delete(self, key: bytes, partition: int) -> None:
        self._data.pop(key, None)

    def commit(self) -> None:
        pass

    def scan(self, partition: int) -> Iterable[tuple[bytes, bytes]]:
        meta = META_PREFIX + str(partition).encode()
        for key, value in list(self._data.items()):
            if key == meta or (
                not key.startswith(META_PREFIX) and self._partition_of(key.decode()) == partition
            ):
                yield key, value

    def page(self, partition: int, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        return self._pages.page(partition, after, limit, self.scan, self._data.get)


class RocksTableStore:
    """StateStore over Faust's RocksDB store: one database per partition.

    Writes are collected in one ``WriteBatch`` per partition and applied by
    :meth:`commit` at the end of each flush: a single RocksDB write per
    partition instead of one per customer (measured ~20 us per single put
    through rocksdict, most of it per-call overhead).
    """

    def __init__(self, table: Any) -> None:
        self._store = table.data
        self._batches: dict[int, Any] = {}

    def _db(self, partition: int) -> Any:
        return self._store._db_for_partition(partition)

    def _batch(self, partition: int) -> Any:
        batch = self._batches.get(partition)
        if batch is None:
            from rocksdict import WriteBatch

            batch = self._batches[partition] = WriteBatch(raw_mode=True)
        return batch

    def get(self, key: bytes, partition: int) -> bytes | None:
        value = self._db(partition).get(key)
        return bytes(value) if value is not None else None

    def put(self, key: bytes, partition: int, value: bytes) -> None:
        self._batch(partition).put(key, value)

    def delete(self, key: bytes, partition: int) -> None:
        self._batch(partition).delete(key)

    def commit(self) -> None:
        batches, self._batches = self._batches, {}
        for partition, batch in batches.items():
            self._db(partition).write(batch)

    def scan(self, partition: int, after: bytes | None = None) -> Iterator[tuple[bytes, bytes]]:
        """The partition's states in key order (after ``after``, if given)."""
        for key, value in self._db(partition).items(from_key=after):
            key = bytes(key)
            if key == after or key.startswith(b"__faust"):
                continue  # __faust*: Faust's own bookkeeping (the changelog offset it has applied)
            yield key, bytes(value)

    def memory(self) -> dict[str, int]:
        """RocksDB's own memory over the open partition databases, in bytes."""
        totals = dict.fromkeys(ROCKSDB_MEMORY, 0)
        for db in list(self._store._dbs.values()):
            for name, prop in ROCKSDB_MEMORY.items():
                totals[name] += db.property_int_value(prop) or 0
        return totals

    def page(self, partition: int, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        # A fresh iterator per page: none is held across awaits, when Faust may
        # close the partition's database (revoked).
        return list(islice(self.scan(partition, after), limit))


def consumer_connected(app: Any) -> bool | None:
    """Whether the Faust app's Kafka consumer has a live broker connection.

    Reads aiokafka's connection table in Faust's consumer thread (private
    attributes of faust-streaming 0.15 and aiokafka 0.1x: ``Consumer._thread``,
    ``AIOKafkaConsumer._client._conns``); the consumer fetches and heartbeats
    all the time, so a live consumer always holds open connections, and
    aiokafka drops a connection the broker closed. None when it cannot tell
    (consumer not started, or internals that moved in another version: then
    the gauge is simply not reported, never a wrong 1).
    """
    try:
        consumer = app.consumer._thread._consumer
        if consumer is None:
            return None
        conns = list(consumer._client._conns.values())  # copied: another thread's dict
        return any(conn.connected() for conn in conns)
    except (AttributeError, RuntimeError):
        return None


class JourneyStage:
    """Wires the journey processor into a Faust app."""

    def __init__(
        self, app: faust.App, settings: Settings, kafka: KafkaSettings, rules: RulesConfig
    ) -> None:
        self.rules = rules
        self.app = app
        self.settings = settings
        topics = settings.topics
        worker = settings.worker
        self.source = app.topic(
            topics.validated,
            key_serializer="raw",
            value_serializer="raw",
            partitions=topics.partitions,
        )
        changelog = app.topic(
            f"{worker.app_id}-journeys-changelog",
            key_serializer="raw",
            value_serializer="raw",
            partitions=topics.partitions,
            compacting=True,
        )
        self.table = app.Table(
            "journeys",
            key_type=bytes,
            value_type=bytes,
            partitions=topics.partitions,
            changelog_topic=changelog,
            options=ROCKSDB_OPTIONS if worker.store.startswith("rocksdb") else None,
        )
        self.output = OutputProducer(
            kafka,
            topics,
            changelog.get_topic_name(),
            single_record_batches=worker.changelog_single_record_batches,
        )
        self.redis = RedisJourneySink(settings.redis) if settings.redis.enabled else None
        self.reader = BundleReader(kafka, topics.validated)
        self.processor: JourneyProcessor | None = None
        self.alerting: AlertStage | None = None
        self.clean_marker: Path | None = None  # rocksdb: written after a clean stop
        self._stream: Any = None
        self._unacked: list[Any] = []
        # Bundles read by the reader (not through Faust), to be acked with _unacked.
        self._refetched: list[tuple[int, range]] = []
        self._refetch_lock = asyncio.Lock()
        self._flush_lock = asyncio.Lock()
        self._flushing: asyncio.Task[None] | None = None
        self.bundles = 0
        self.touchpoints = 0
        self.refetched = 0  # bundles the consumer skipped, read again (see refetch)
        self._handled: dict[int, int] = {}  # partition -> offset of the last bundle handled
        self.flushed_touchpoints = 0  # touchpoints whose effects a completed flush persisted
        self.first_bundle_at: float | None = None
        self.last_flush_at: float | None = None
        self.delivery_failed = False  # a flush could not deliver: never ack again
        # Flush every flush_interval_s, or less often while working through a backlog.
        self.pacer = FlushPacer(worker.flush_interval_s, worker.flush_backlog_interval_s)
        self.flushes = 0  # completed
        self.flushes_deferred = 0  # timer ticks skipped while working through a backlog

        app.agent(self.source, name="journeys")(self.consume)
        app.timer(worker.flush_interval_s, name="journeys.flush")(self.flush_tick)
        app.timer(worker.sweep_interval_s, name="journeys.sweep")(self.sweep)
        app.timer(5.0, name="journeys.gauges")(self.gauges)
        # Re-seek after stall_s without progress, up to 3 times; exit after 4 x stall_s.
        self.recovery_watch = RecoveryWatch(worker.recovery_stall_s, nudges=3)
        app.timer(5.0, name="recovery.watch")(self.watch_recovery)
        app.timer(60.0, name="memory.trim")(self.trim_memory)
        app.timer(settings.kafka.statistics_interval_ms / 1000, name="kafka.consumer_up")(
            self.consumer_health
        )
        # mode's SignalHandlerT is (sender, *args, signal=, **kwargs): it cannot
        # express the required ``revoked`` argument that Faust always sends.
        app.on_partitions_revoked.connect(self.on_revoked)  # type: ignore[arg-type]
        app.on_before_shutdown.connect(self.on_shutdown)

        # Faust calls page functions as fun(view, request, **match_info); bound
        # methods do not fit that, hence the plain functions.
        async def journey_page(web: Any, request: Any, customer: str) -> Any:
            return await self.get_journey(web, request, customer)

        async def metrics_page(web: Any, request: Any) -> Any:
            return await self.get_metrics(web, request)

        async def health_page(web: Any, request: Any) -> Any:
            return await self.get_health(web, request)

        async def stats_page(web: Any, request: Any) -> Any:
            return web.json(self.stats())

        # Faust types the routed view as a union with a two-argument form; the
        # wrapper it returns takes (view, request, *args, **kwargs).
        routed: Callable[..., Awaitable[Any]] = app.table_route(
            table=self.table, match_info="customer"
        )(journey_page)

        async def journey_entry(web: Any, request: Any, customer: str) -> Any:
            # Right after start-up or a rebalance, Faust's router can fail with
            # a TypeError/KeyError before the assignment metadata is in: that is
            # "not ready yet" (503, retry), not a server error.
            try:
                return await routed(web, request, customer=customer)
            except (TypeError, KeyError) as exc:
                log.warning("journey lookup before routing metadata is ready: %r", exc)
                return web.json(
                    {"error": "not_ready", "customer_id": customer, "retry_after_s": 1},
                    status=503,
                    headers={"Retry-After": "1"},
                )

        app.page("/journeys/{customer}/")(journey_entry)
        app.page("/metrics")(metrics_page)
        app.page("/health")(health_page)
        app.page("/stats")(stats_page)

    # ---------------------------------------------------------------- processor
    def _processor(self) -> JourneyProcessor:
        if self.processor is None:
            worker = self.settings.worker
            partitions = self.settings.topics.partitions
            store: StateStore = (
                RocksTableStore(self.table)
                if worker.store.startswith("rocksdb")
                else MemoryTableStore(self.table, partitions)
            )
            self.processor = JourneyProcessor(
                Sessionizer(self.settings.journey.session_config(), RuleEngine(self.rules)),
                partitions=partitions,
                store=store,
                output=self.output,
                topics=self.settings.topics,
                redis=self.redis.start() if self.redis is not None else None,
                idle_ms=int(worker.idle_s * 1000),
                spikes=self.rules.spikes,
            )
        return self.processor

    # ---------------------------------------------------------------- agent
    async def consume(self, stream: Any) -> None:
        self._stream = stream.noack()
        processor = self._processor()
        limit = self.settings.worker.max_unacked_bundles
        if not self.pacer.measured:
            time_idle(asyncio.get_running_loop(), self.pacer)
        async for event in self._stream.events():
            message = event.message
            if self.first_bundle_at is None:
                self.first_bundle_at = time.time()
            if self._refetch_lock.locked():
                async with self._refetch_lock:
                    pass  # the sweep is applying skipped bundles: they go first
            if processor.missing(message.partition, message.offset) and not await self.refetch(
                message.partition, message.offset
            ):
                continue  # the partition moved meanwhile: its next owner reads this bundle
            self._apply(message.partition, message.offset, message.value)
            self._unacked.append(event)
            # Let the loop run between bundles. Taking the next bundle from a
            # non-empty stream buffer does not suspend, so without this the
            # agent could drain thousands of buffered bundles in one go while
            # the web server (lookups), the flush and sweep timers and Faust's
            # fetch task (which starts the next fetch) all waited. In paired
            # worker-alone runs the process went from 0.71-0.96 to 0.88-0.99
            # CPU/wall (events/s: means 28.3k -> 30.0k over 7 pairs, within noise).
            await asyncio.sleep(0)
            if len(self._unacked) >= limit:
                # Flush in the background while the next bundles are processed:
                # waiting here for the broker's acknowledgement idled the
                # worker ~10% of the time. Past twice the limit, wait for it
                # (backpressure bounds what a crash can replay).
                if self._flushing is None or self._flushing.done():
                    self._flushing = asyncio.ensure_future(self.flush())
                elif len(self._unacked) >= 2 * limit:
                    await self._flushing

    def _apply(self, partition: int, offset: int, value: bytes) -> None:
        """Apply one bundle (from Faust's stream or read again) and count it."""
        assert self.processor is not None
        self._handled[partition] = offset
        self.touchpoints += self.processor.handle(partition, offset, value)
        self.bundles += 1

    async def flush_tick(self) -> None:
        """The flush timer: flush, unless the worker is working through a backlog (FlushPacer)."""
        if self.pacer.due():
            await self.flush()
        else:
            self.flushes_deferred += 1
            metrics.FLUSHES_DEFERRED.inc()

    async def flush(self) -> None:
        """Persist state and outputs, then ack the bundles they came from."""
        if self.processor is None or self.delivery_failed:
            return
        async with self._flush_lock:
            if self.delivery_failed:
                return
            started = time.perf_counter()
            self.pacer.flushed()
            events, self._unacked = self._unacked, []
            refetched, self._refetched = self._refetched, []
            covered = self.touchpoints
            changelog: list[tuple[int, bytes, bytes | None]] = []
            self.processor.flush(deferred=changelog)
            loop = asyncio.get_running_loop()
            try:
                # Outputs first, then the states that claim them (see
                # JourneyProcessor.flush): both must be delivered before the ack.
                await loop.run_in_executor(None, self.output.flush)
                self.processor.write_changelog(changelog)
                await loop.run_in_executor(None, self.output.flush)
                self.processor.publish_mirror()  # Redis shows only durable state
            except Exception as exc:
                # Acking anything after this could commit past the undelivered
                # records, so this worker stops for good and a restart replays
                # from the last commit. Faust's graceful stop can hang when the
                # broker is gone (rebalance and shutdown handlers wait on it):
                # the watchdog makes sure the process exits for its supervisor.
                self.delivery_failed = True
                log.error("could not deliver state/outputs; exiting to replay: %s", exc)
                _exit_after(CRASH_EXIT_S)
                await self.app.crash(exc)
                return
            for event in events:
                await self._stream.ack(event)
            for partition, offsets in refetched:
                await self._ack_range(partition, offsets)
            self.flushed_touchpoints = covered
            self.last_flush_at = time.time()
            self.flushes += 1
            if self.redis is not None and self.redis.needs_resync and self.redis.healthy:
                self.redis.needs_resync = False
                self.processor.resync_redis()
            metrics.STATE_FLUSH_SECONDS.observe(time.perf_counter() - started)

    async def refetch(self, partition: int, before: int) -> bool:
        """Read the bundles before ``before`` that were skipped straight from Kafka and apply them.

        Returns False if the partition was revoked meanwhile (nothing of it
        is applied then). See :meth:`JourneyProcessor.missing`. Called by the
        agent before the bundle at ``before`` and by the sweep for the
        committed offset (skipped bundles with nothing after them yet); the
        lock keeps them from applying bundles out of order.
        """
        async with self._refetch_lock:
            return await self._refetch(partition, before)

    async def _refetch(self, partition: int, before: int) -> bool:
        processor = self._processor()
        missing = processor.missing(partition, before)
        if not missing:
            return True
        limit = self.settings.worker.refetch_max_bundles
        first, last = missing.start, missing.stop - 1
        if len(missing) > limit:
            log.error(
                "partition %d: bundles %d..%d were never applied and are more than "
                "refetch_max_bundles (%d): not read again (offsets reset on purpose?)",
                partition,
                first,
                last,
                limit,
            )
            metrics.BUNDLES_SKIPPED.inc(len(missing))
            processor.pass_over(partition, missing)
            return True
        generation = self.app.consumer_generation_id
        log.warning(
            "partition %d: the consumer skipped bundles %d..%d (before %d); reading them again",
            partition,
            first,
            last,
            before,
        )
        loop = asyncio.get_running_loop()
        try:
            records = await loop.run_in_executor(None, self.reader.read, partition, missing)
        except Exception as exc:
            # Going on would leave the bundles out for good: stop as a failed
            # flush does. The next owner finds the same bundles missing (its
            # meta record's offset is this one's) and reads them again.
            self.delivery_failed = True
            log.error("could not read skipped bundles; exiting to replay: %s", exc)
            _exit_after(CRASH_EXIT_S)
            await self.app.crash(exc)
            return False
        if self.app.consumer_generation_id != generation or partition not in processor.parts:
            log.warning("partition %d moved during the refetch: left to its next owner", partition)
            return False
        for offset, value in records:
            self._apply(partition, offset, value)
        processor.pass_over(partition, missing)  # offsets with no record any more included
        self._refetched.append((partition, missing))
        self.refetched += len(records)
        metrics.BUNDLES_REFETCHED.inc(len(records))
        if len(records) < len(missing):
            log.error(
                "partition %d: %d of bundles %d..%d are no longer in %s (retention)",
                partition,
                len(missing) - len(records),
                first,
                last,
                self.reader.topic,
            )
            metrics.BUNDLES_SKIPPED.inc(len(missing) - len(records))
        return True

    async def _ack_range(self, partition: int, offsets: range) -> None:
        """Tell Faust's consumer that refetched offsets may be committed.

        Faust commits the acked offsets that follow the committed one without
        a hole. Bundles it skipped are either already counted as a "gap"
        (acked) or were dropped unacked, which would hold its commits back
        from then on. Its gap bookkeeping (``Consumer._add_gap``, private in
        faust-streaming 0.15) is how they are marked: the refetched bundles
        are persisted by now, as acked events are.
        """
        add_gap = getattr(self.app.consumer, "_add_gap", None)
        if add_gap is None:
            return
        tp = TP(self.source.get_topic_name(), partition)
        if tp in self.app.consumer.assignment():
            await add_gap(tp, offsets.start, offsets.stop - 1)

    async def sweep(self) -> None:
        if self.processor is None or self.app.rebalancing or self.app.in_recovery:
            return
        # Partitions that get no events still need their journeys closed on time.
        topic = self.source.get_topic_name()
        for tp in list(self.app.assignor.assigned_actives()):
            if tp.topic != topic:
                continue
            if tp.partition not in self.processor.parts:
                self.processor.load_partition(tp.partition)
            await self._refetch_before_committed(tp)
            if self.app.rebalancing:
                return  # began during the refetch: the partitions may be gone
        self.processor.sweep()
        self.processor.expire_stored()

    async def _refetch_before_committed(self, tp: Any) -> None:
        """Skipped bundles that no later bundle has revealed yet, found by the committed offset.

        Faust commits offsets of bundles it skipped (acked as skipped, or
        booked as a gap): bundles between the last one applied and the
        group's committed offset were skipped. Read from Faust's consumer
        (``_committed_offset``, private in faust-streaming 0.15; absent: no check).
        """
        processor = self.processor
        if processor is None:
            return
        committed = getattr(self.app.consumer, "_committed_offset", {}).get(tp)
        if committed is not None and processor.missing(tp.partition, committed):
            await self.refetch(tp.partition, committed)

    async def watch_recovery(self) -> None:
        """Nudge a changelog recovery that stopped making progress, or exit (streams/watchdog.py)."""
        recovery: Any = self.app.tables.recovery  # type: ignore[attr-defined]  # TableManager's
        remaining = recovery.active_remaining() if recovery.in_recovery else None
        verdict = self.recovery_watch.check(remaining)
        if verdict is None:
            return
        action, stuck = verdict
        consumer = self.app.consumer
        paused: set[Any] = getattr(consumer, "_paused_partitions", set())
        assigned = consumer.assignment()
        detail = ", ".join(
            f"{tp.topic}[{tp.partition}] at {recovery.active_offsets.get(tp)} of "
            f"{recovery.active_highwaters.get(tp)}"
            f"{' (paused)' if tp in paused else ''}{'' if tp in assigned else ' (not assigned)'}"
            for tp in stuck
        )
        stall_s = self.recovery_watch.stall_s
        if action == "nudge":
            log.warning(
                "changelog recovery made no progress for %.0f s: %s; seeking those partitions "
                "again",
                stall_s,
                detail,
            )
            metrics.RECOVERY_NUDGES.inc()
            consumer.resume_partitions(stuck)
            await consumer.seek_wait(
                {tp: max(recovery.active_offsets.get(tp) or 0, 0) for tp in stuck}
            )
            return
        log.error(
            "changelog recovery still made no progress %.0f s after seeking again: %s; exiting "
            "so that the supervisor starts the worker again",
            stall_s,
            detail,
        )
        self.delivery_failed = True  # nothing acked from here on
        _exit_after(CRASH_EXIT_S)
        await self.app.crash(RuntimeError("changelog recovery stalled"))

    async def trim_memory(self) -> None:
        took = release_free_memory()
        if took > 0.05:
            log.info("malloc_trim took %.0f ms", took * 1000)

    async def consumer_health(self) -> None:
        """``touchpoint_kafka_up{client="worker_consumer"}``: the bundle consumer's connections.

        The worker's librdkafka clients (its output producer) report their
        broker states themselves (:func:`touchpoint.producer.broker_health`);
        the consumer is Faust's aiokafka client, which has no such statistics.
        """
        up = consumer_connected(self.app)
        if up is not None:
            metrics.KAFKA_UP.labels("worker_consumer").set(1 if up else 0)

    async def gauges(self) -> None:
        if self.processor is None:
            return
        counts = self.processor.active_by_stage()
        for stage in ("none", "awareness", "consideration", "purchase", "retention", "advocacy"):
            metrics.JOURNEYS_ACTIVE.labels(stage).set(counts.get(stage, 0))
        self.report_lag()

    def report_lag(self) -> None:
        """Consumer lag of the validated stream, per assigned partition.

        High watermark (cached by the client from its latest fetch: no broker
        call) minus the offset after the last bundle handled, or the committed
        offset before the first one. Partitions without either are skipped.
        """
        consumer = self.app.consumer
        committed = getattr(consumer, "_committed_offset", {})  # Faust's, set on assignment
        topic = self.source.get_topic_name()
        group = self.settings.worker.app_id
        for tp in self.app.assignor.assigned_actives():
            if tp.topic != topic:
                continue
            handled = self._handled.get(tp.partition)
            next_offset = handled + 1 if handled is not None else None
            if next_offset is None:
                next_offset = committed.get(tp)
            try:
                high = consumer.highwater(tp)
            except Exception:  # not assigned any more (rebalance in progress)
                continue
            if high is None or next_offset is None:
                continue
            metrics.CONSUMER_LAG.labels(group, topic, str(tp.partition)).set(
                max(0, high - next_offset)
            )

    async def on_revoked(self, app: Any, revoked: set[Any], **_kw: Any) -> None:
        if self.processor is None:
            return
        # Bundles handled while a flush awaits the broker are not in that flush.
        # Their state changes would be dropped with the partition below while
        # the bundles stay in the unacked list, to be acked by a later flush:
        # if this worker keeps the partition, Faust does not read them again
        # and they are lost. So flush until nothing is left unpersisted (the
        # check and the drop below run without an await in between).
        for _ in range(20):
            await self.flush()
            if not self._unacked or self.delivery_failed:
                break
        topic = self.source.get_topic_name()
        gone = {tp.partition for tp in revoked if tp.topic == topic}
        if self._unacked:
            # Still not persisted (delivery failed, or the stream would not pause):
            # never ack them; whoever owns the partitions next reads them again.
            self._unacked = [e for e in self._unacked if e.message.partition not in gone]
        for partition in gone:
            self.processor.drop_partition(partition)
            self._handled.pop(partition, None)
            # Another worker reports this partition's lag from now on.
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(self.settings.worker.app_id, topic, str(partition))

    def stats(self) -> dict[str, Any]:
        """Counters for benchmarks and operators (this worker only)."""
        processor = self.processor
        sizes = processor.state_sizes if processor else {}
        aggregator = self.alerting.aggregator if self.alerting else None
        return {
            "bundles": self.bundles,
            "touchpoints": self.touchpoints,
            "refetched_bundles": self.refetched,
            "flushed_touchpoints": self.flushed_touchpoints,
            "first_bundle_at": self.first_bundle_at,
            "last_flush_at": self.last_flush_at,
            "flushes": self.flushes,
            "flushes_deferred": self.flushes_deferred,
            # False: the event loop's idle time cannot be measured, so the
            # flush never waits for a backlog (streams/pacing.py).
            "flush_pacing_measured": self.pacer.measured,
            "counts": dict(processor.counts) if processor else {},
            "cached_states": len(processor.cache) if processor else 0,
            # Customers with a pending deadline (journey close, rule, or expiry
            # of a state kept for returning customers), held in memory.
            "scheduled_states": (
                sum(len(p.scheduled) for p in processor.parts.values()) if processor else 0
            ),
            "heap_entries": (
                sum(len(p.heap) for p in processor.parts.values()) if processor else 0
            ),
            # Python objects alive (pymalloc blocks): separates growth of Python
            # state from native memory (RocksDB, librdkafka) in soak runs.
            "allocated_blocks": sys.getallocatedblocks(),
            "state_bytes_by_touchpoints": {
                n: round(total / states) for n, (states, total) in sorted(sizes.items())
            },
            "redis_written": self.redis.written if self.redis else 0,
            "redis_pending": len(self.redis._pending) if self.redis else 0,
            # Soak tests watch these for leaks (python -m touchpoint.soak).
            "asyncio_tasks": len(asyncio.all_tasks()),
            "threads": threading.active_count(),
            "alerts_sent": self.alerting.alerts_sent if self.alerting else 0,
            "alerts_firing": aggregator.firing() if aggregator else {},
            # Start of the last alert window closed on this worker (-1: none; only
            # the worker that owns the signal-counts partition closes windows).
            "alert_window_closed": aggregator.state.last_closed if aggregator else -1,
            "alert_late_signals": aggregator.late_signals if aggregator else 0,
            "malloc": malloc_stats(),
            # RocksDB's memory outside Python (memtables, block cache, index and
            # filter blocks of table readers) and its estimated keys.
            "rocksdb": (
                processor.store.memory()
                if processor and isinstance(processor.store, RocksTableStore)
                else {}
            ),
        }

    async def on_shutdown(self, app: Any, /, *_args: Any, **_kw: Any) -> None:
        """Clean stop: persist and ack what was processed, so a restart replays nothing."""
        if self.processor is not None:
            await self.flush()
        if self.clean_marker is not None and not self.delivery_failed:
            # Everything local is also in the changelog: keep it for the next start.
            self.clean_marker.parent.mkdir(parents=True, exist_ok=True)
            self.clean_marker.touch()
        if self.redis is not None:
            self.redis.stop()
        self.reader.close()

    # ---------------------------------------------------------------- web
    async def get_journey(self, web: Any, request: Any, customer: str) -> Any:
        found = self._processor().lookup(customer)
        if found is None:
            return web.json({"error": "not_found", "customer_id": customer}, status=404)
        return web.json(found)

    async def get_metrics(self, web: Any, request: Any) -> Any:
        return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])

    async def get_health(self, web: Any, request: Any) -> Any:
        return web.json(
            {
                "ready": self.processor is not None and not self.app.rebalancing,
                "partitions": sorted(self.processor.parts) if self.processor else [],
                "bundles": self.bundles,
                "touchpoints": self.touchpoints,
                "redis_healthy": self.redis.healthy if self.redis else None,
            }
        )


class AlertStage:
    """Counts from every worker partition -> windows -> spike detectors -> alerts.

    The counts topic has one partition, so exactly one worker runs this stage
    (Faust moves it on rebalance). Its durable state (last closed window,
    detector baselines) is one entry of a small table, written after the
    alerts of a closed window are delivered; counts need no persistence since
    every worker re-sends its cumulative counts each second.
    """

    KEY = b"state"

    def __init__(
        self, app: faust.App, settings: Settings, output: OutputProducer, rules: RulesConfig
    ) -> None:
        self.app = app
        self.settings = settings
        self.output = output
        self.rules = rules
        topics = settings.topics
        self.topic = app.topic(
            topics.signal_counts, key_serializer="raw", value_serializer="raw", partitions=1
        )
        changelog = app.topic(
            f"{settings.worker.app_id}-alerting-changelog",
            key_serializer="raw",
            value_serializer="raw",
            partitions=1,
            compacting=True,
        )
        self.table = app.Table(
            "alerting", key_type=bytes, value_type=bytes, partitions=1, changelog_topic=changelog
        )
        self.aggregator: WindowAggregator | None = None
        self.alerts_sent = 0
        app.agent(self.topic, name="alerting")(self.consume)

    def _aggregator(self) -> WindowAggregator:
        if self.aggregator is None:
            raw = self.table.get(self.KEY)
            state = msgspec.msgpack.decode(raw, type=AlertState) if raw else None
            series = [(r.name, ch) for r in self.rules.rules for ch in (*CHANNELS, ALL_CHANNELS)]
            self.aggregator = WindowAggregator(
                self.rules.spikes,
                self.settings.topics.partitions,
                series,
                {r.name: r.severity for r in self.rules.rules},
                overrides=self.rules.spike_overrides,
                state=state,
            )
            # Every series exists from the start (0: not firing), so dashboards
            # and alert rules see "not firing" rather than "no data".
            firing = self.aggregator.firing()
            for rule, channel in series:
                metrics.ALERTS_FIRING.labels(rule, channel).set(int(f"{rule}|{channel}" in firing))
        return self.aggregator

    async def consume(self, stream: Any) -> None:
        # Reports are acked only once a saved state contains them: a partition
        # stops reporting a window once it pruned it, so a report consumed,
        # committed and then lost with the unsaved state would never come again.
        stream = stream.noack()
        unsaved: list[Any] = []
        async for event in stream.events():
            unsaved.append(event)
            aggregator = self._aggregator()
            try:
                aggregator.update(_partial_decoder.decode(event.value))
            except (msgspec.DecodeError, msgspec.ValidationError):
                log.error("ignoring a corrupt signal-count report at %s", event.message.offset)
                continue
            late, silent = aggregator.late_signals, set(aggregator.silent)
            before = aggregator.state.last_closed
            alerts = aggregator.close_ready()
            if aggregator.late_signals > late:
                metrics.ALERT_LATE_SIGNALS.inc(aggregator.late_signals - late)
                log.warning(
                    "%d signal(s) reported after their window closed (total %d)",
                    aggregator.late_signals - late,
                    aggregator.late_signals,
                )
            if aggregator.silent != silent:
                metrics.ALERT_SILENT_PARTITIONS.set(len(aggregator.silent))
                log.warning(
                    "signal-count reports silent for partitions %s: windows close without them",
                    sorted(aggregator.silent),
                )
            if aggregator.state.last_closed == before:
                continue
            for alert in alerts:
                record = jsonio.dumps(alert)
                self.output.record(self.settings.topics.alerts, alert["alert_id"], record)
                rule, channel = alert["rule"], alert["channel"]
                metrics.ALERTS.labels(rule, channel, alert["state"]).inc()
                metrics.ALERTS_FIRING.labels(rule, channel).set(int(alert["state"] == "firing"))
                log.warning("alert %s: %s", alert["state"], alert["description"])
            self.alerts_sent += len(alerts)
            for key, detector in aggregator.state.detectors.items():
                rule, channel = key.split("|")
                metrics.ALERT_BASELINE.labels(rule, channel).set(round(detector.mean, 3))
            for key, count in aggregator.last_counts.items():
                rule, channel = key.split("|")
                metrics.ALERT_WINDOW_SIGNALS.labels(rule, channel).set(count)
            if alerts:
                # Delivered before the state that says "this window is done" is saved.
                await asyncio.get_running_loop().run_in_executor(None, self.output.flush)
            self.table[self.KEY] = msgspec.msgpack.encode(aggregator.state)
            # Faust flushes its producer (the table's changelog) before it commits.
            for saved in unsaved:
                await stream.ack(saved)
            unsaved.clear()


_partial_decoder = msgspec.json.Decoder(Partial)


def _exit_after(seconds: float, code: int = 1) -> None:
    """Exit the process with ``code`` in ``seconds`` unless it has exited by then."""

    def watchdog() -> None:
        time.sleep(seconds)
        log.critical("worker did not stop within %.0f s of a crash; exiting now", seconds)
        logging.shutdown()
        os._exit(code)

    threading.Thread(target=watchdog, name="crash-watchdog", daemon=True).start()


class _ShortFetchWaitThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread with a configurable fetch wait.

    Faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` and no
    setting to change it. aiokafka keeps one fetch in flight per broker, and
    leaves out of it the partitions whose previous records are still being
    handed over. When the partitions that are in it have nothing new (the
    worker has caught up on them), the broker holds the fetch up to that
    wait, and partitions drained meanwhile cannot be fetched until it
    returns: the worker idles with data waiting. Measured on 2026-12-05
    (embedded broker, 4 partitions, 200k events end to end): with 1,500 ms
    some ``getmany`` calls waited 0.3-1.0 s and the worker was idle ~25 %
    of the time (38-40k events/s); with 100 ms the longest wait was ~0.1 s,
    CPU/wall ~0.98, 50-52k events/s. An idle worker then sends ~10 empty
    fetches a second per broker, a negligible load.

    The wait comes from ``WorkerSettings.fetch_max_wait_ms`` through the
    transport (:func:`_use_fetch_max_wait`); aiokafka reads
    ``_fetch_max_wait_ms`` when the consumer starts, after this sets it.
    """

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        ours: Any = self.transport
        consumer._fetch_max_wait_ms = ours.touchpoint_fetch_max_wait_ms
        return consumer


class _ShortFetchWaitConsumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ShortFetchWaitThread(self, loop=self.loop, beacon=self.beacon)


def _use_fetch_max_wait(app: faust.App, wait_ms: int) -> None:
    """Make ``app``'s consumer ask the broker to answer fetches within ``wait_ms``."""
    transport: Any = app.transport  # resolves its event loop lazily: safe before start
    transport.touchpoint_fetch_max_wait_ms = wait_ms
    transport.Consumer = _ShortFetchWaitConsumer


def create_app(
    settings: Settings, kafka: KafkaSettings | None = None
) -> tuple[faust.App, JourneyStage]:
    """The Faust app for ``settings`` (Kafka, topics, worker, journey, rules, Redis)."""
    kafka = kafka or settings.kafka
    worker = settings.worker
    rules = load_rules(worker.rules_file)
    # Read now: a bad TOUCHPOINT_JOURNEY_* value must stop the worker at start-up
    # (one line), not crash its agent in a loop every 5 s behind a "ready" worker.
    settings.journey.session_config()
    os.makedirs(worker.state_dir, exist_ok=True)  # Faust creates only the last level
    app = faust.App(
        worker.app_id,
        broker=[f"kafka://{server}" for server in kafka.bootstrap_servers.split(",")],
        broker_credentials=kafka.faust_credentials(),
        broker_session_timeout=kafka.session_timeout_ms / 1000,
        broker_heartbeat_interval=kafka.heartbeat_interval_ms / 1000,
        store=worker.store,
        datadir=worker.state_dir,
        web_host=worker.web_host,
        web_port=worker.web_port,
        canonical_url=worker.url,
        producer_linger=0.05,
        topic_partitions=settings.topics.partitions,
        topic_replication_factor=settings.topics.replication_factor,
        table_standby_replicas=worker.standby_replicas,
        # Bundles are acked only after the flush that persisted them; commits
        # follow acks and replays are skipped per customer, so Faust need not
        # wait for unacked bundles on rebalance or shutdown (we flush there).
        stream_wait_empty=False,
        consumer_auto_offset_reset="earliest",
        # Tansu workaround (tests/demo only), as for the journeys changelog: the
        # alerting table's changelog is written by Faust's producer.
        producer_max_batch_size=1 if worker.changelog_single_record_batches else None,
    )
    _use_fetch_max_wait(app, worker.fetch_max_wait_ms)
    if worker.store.startswith("rocksdb"):
        stage_marker = _wipe_after_unclean_stop(Path(app.conf.tabledir))
    else:
        stage_marker = None
    stage = JourneyStage(app, settings, kafka, rules)
    stage.clean_marker = stage_marker
    stage.alerting = AlertStage(app, settings, stage.output, rules)
    return app, stage


CLEAN_MARKER = "clean-shutdown"


def _wipe_after_unclean_stop(tabledir: Path) -> Path:
    """Drop local table state unless the last run stopped cleanly; returns the marker path.

    The local RocksDB store is written when a flush starts, the changelog only
    once the flush's outputs are delivered. After a crash the local store can
    therefore hold states (with their applied positions) whose outputs never
    reached Kafka, and a restart would skip those bundles. As Kafka Streams
    does under exactly-once after an unclean shutdown, the local state is
    wiped and rebuilt from the changelog, which never runs ahead of the
    outputs. A clean stop (final flush delivered) leaves a marker that keeps
    the local state for a fast restart.
    """
    marker = tabledir / CLEAN_MARKER
    if marker.exists():
        marker.unlink()
    elif tabledir.exists() and any(tabledir.iterdir()):
        log.warning(
            "last run did not stop cleanly: rebuilding local state %s from changelogs", tabledir
        )
        shutil.rmtree(tabledir)
    return marker
