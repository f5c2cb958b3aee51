"""Crash and rebalance scenarios with exact accounting of every event (SPEC §10).

Simulated traffic (with identity stitching and a payment outage), a few
deliberately late events and some junk goes through the raw topics, ingest
and worker processes. Workers are killed (``kill -9``), stopped (SIGTERM),
restarted and added mid-stream. Afterwards every produced event must be found
exactly once: in a closed journey (summaries deduplicated by journey id), in a
journey still open (the worker's lookup), on the late topic or on the
dead-letter topic. Output records published twice must be identical to the
first copy (at-least-once output, deduplicable by id).

The stream ends with one event per partition far later than the traffic, so
every partition's stream time passes every journey's deadline: in a replay of
history the wall clock does not move stream time on (streams/core/clock.py).

Used by tests/integration/test_reliability_crash.py, and runnable at full
scale with its figures printed::

    python -m tests.reliability crash --events 200000
    python -m tests.reliability rebalance --events 200000
"""

from __future__ import annotations

import argparse
import base64
import gc
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from schemas.registry import uri_for
from streams.bundles import Partitioner
from tests.pipeline import Pipeline, WorkerProcess, wait_until
from tests.scenarios import T0
from touchpoint import jsonio
from touchpoint.config import KafkaSettings, RedisSettings, TopicSettings
from touchpoint.producer import producer_config
from touchpoint.simulator import Incident, Simulator, event_time_ms
from touchpoint.topics import ensure_topics

MINUTE = 60_000
HOUR = 60 * MINUTE
RATE = 50.0  # simulated events per second of event time (200k events: ~67 minutes)
PARTITIONS = 4
# Journeys close within the traffic's time span: 10-minute gap, 1 minute of grace.
JOURNEY = {"gap_minutes": "10", "grace_minutes": "1"}
LATE_EVERY = 2_000  # one event 2 h behind the stream per this many events...
LATE_FROM = 30_000  # ... after this many (ingest reads up to 20k at once)
JUNK_EVERY = 5_000  # one refused input per this many events
MAX_LOOKUPS = 300  # customers looked up on the worker for open journeys


# ---------------------------------------------------------------------------- traffic
@dataclass
class Traffic:
    """What goes into the raw topics, in order: (source, key, value)."""

    records: list[tuple[str, bytes, bytes]]
    valid: set[str]  # event ids of every valid event produced
    key_of: dict[str, str]  # event id -> routing key (customer, else anonymous id)
    late: set[str]  # ids of the events injected 2 h behind the stream
    junk: set[str]  # markers of the refused inputs
    closers: list[str]  # one key per validated partition, with the stream's last event
    # Keys in identify events: their journeys depend on when stitching items,
    # which the worker sends through Kafka, arrive (README: a known limit).
    stitched: set[str]

    @property
    def events(self) -> int:
        return len(self.records)


def _junk(marker: str, kind: int) -> bytes:
    if kind == 0:  # not JSON at all
        return f'{{"event_id": "{marker}", "event_type": "page_view", '.encode()
    doc: dict[str, Any] = {
        "schema": uri_for("page_view"),
        "event_id": marker,
        "event_type": "page_view",
        "channel": "web",
        "occurred_at": T0,
        "customer_id": "cust-junk",
        "properties": {"url": "/"},
    }
    if kind == 1:
        del doc["customer_id"]  # no identity
    elif kind == 2:
        doc["occurred_at"] = "yesterday"
    else:
        doc["schema"] = "iglu:com.touchpoint/no_such_event/jsonschema/1-0-0"
    return jsonio.dumps(doc)


def build_traffic(events: int, seed: int = 7, partitions: int = PARTITIONS) -> Traffic:
    """``events`` simulated events plus injected late events, junk and the closing events."""
    # Nothing here makes reference cycles; the cyclic GC rescanning every record
    # kept so far made building 200k events take 4x longer.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _build_traffic(events, seed, partitions)
    finally:
        if enabled:
            gc.enable()


def _build_traffic(events: int, seed: int, partitions: int) -> Traffic:
    span_s = events / RATE
    sim = Simulator(
        seed=seed,
        start_ms=T0,
        rate=RATE,
        customers=int(RATE * 1000),
        incidents=[Incident("payment_outage", 0.5 * span_s, max(0.15 * span_s, 300.0))],
        anonymous_share=0.3,
    )
    records: list[tuple[str, bytes, bytes]] = []
    valid: set[str] = set()
    key_of: dict[str, str] = {}
    late: set[str] = set()
    junk: set[str] = set()
    stitched: set[str] = set()
    last_ms = T0
    for i, (source, event) in enumerate(sim.take(events)):
        key = event.get("customer_id") or event["anonymous_id"]
        records.append((source, key.encode(), jsonio.dumps(event)))
        valid.add(event["event_id"])
        key_of[event["event_id"]] = key
        ts = event_time_ms(event)
        last_ms = max(last_ms, ts)
        if event["event_type"] == "identify":
            stitched.update((event["customer_id"], event["anonymous_id"]))
        # Not in ingest's first batches: whatever was read together is released
        # in event-time order, and the stream has no "before" to be late for.
        if i >= LATE_FROM and i % LATE_EVERY == LATE_EVERY // 2 and event.get("customer_id"):
            late_id = f"late-{seed}-{i}"
            late_event = {
                "schema": uri_for("page_view"),
                "event_id": late_id,
                "event_type": "page_view",
                "channel": "web",
                "occurred_at": ts - 2 * HOUR,
                "customer_id": event["customer_id"],
                "properties": {"url": "/late"},
            }
            records.append(("web", key.encode(), jsonio.dumps(late_event)))
            valid.add(late_id)
            key_of[late_id] = key
            late.add(late_id)
        if i % JUNK_EVERY == JUNK_EVERY // 3:
            marker = f"junk-{seed}-{i}"
            records.append((source, key.encode(), _junk(marker, len(junk) % 4)))
            junk.add(marker)
    # The stream's last events: far enough ahead to pass every deadline (journey
    # gaps, grace, the 1 h cart rule), one on each validated partition.
    partition_of = Partitioner(partitions)
    closers: list[str] = []
    for p in range(partitions):
        key = next(k for j in range(1000) if partition_of(k := f"closer-{seed}-{j}") == p)
        closers.append(key)
        event_id = f"closer-{seed}-{p}"
        closer = {
            "schema": uri_for("page_view"),
            "event_id": event_id,
            "event_type": "page_view",
            "channel": "web",
            "occurred_at": last_ms + 3 * HOUR,
            "customer_id": key,
            "properties": {"url": "/"},
        }
        records.append(("web", key.encode(), jsonio.dumps(closer)))
        valid.add(event_id)
        key_of[event_id] = key
    return Traffic(records, valid, key_of, late, junk, closers, stitched)


# One raw partition carries all traffic, so its order (event time) is what ingest
# reads whatever the timing: with many raw partitions a loaded machine can make
# ingest's alignment give up on a slow partition and release minutes of disorder,
# which turns events late differently from run to run (an ingest matter; here
# we want runs that are comparable with each other).
RAW_SOURCE = "web"


def _producer(kafka: KafkaSettings, linger_ms: int) -> Producer:
    return Producer(producer_config(kafka, **{"linger.ms": linger_ms}))


def _send(producer: Producer, topic: str, key: bytes, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, value, key=key, partition=0)
            return
        except BufferError:
            producer.poll(0.05)


def produce(
    kafka: KafkaSettings, topics: TopicSettings, records: list[tuple[str, bytes, bytes]]
) -> None:
    producer = _producer(kafka, 20)
    topic = topics.raw(RAW_SOURCE)
    for _source, key, value in records:
        _send(producer, topic, key, value)
    assert producer.flush(120) == 0, "could not produce the traffic"


class Pacer:
    """Sends the traffic like live traffic, up to a limit the test moves on.

    The test lets through a share of the traffic before and after each
    worker change, so every change happens while traffic flows however long
    the rebalances take.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        records: list[tuple[str, bytes, bytes]],
        per_second: float,
    ) -> None:
        self.kafka, self.topics, self.records, self.per_second = kafka, topics, records, per_second
        self.sent = 0
        self.limit = 0
        self.failure: BaseException | None = None
        self._moved = threading.Condition()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def allow(self, records: int) -> int:
        """Let ``records`` more through; returns the new limit."""
        with self._moved:
            self.limit = min(len(self.records), max(self.limit, self.sent) + records)
            self._moved.notify_all()
        if not self._thread.is_alive() and self.sent == 0:
            self._thread.start()
        return self.limit

    def wait_sent(self, mark: int, timeout: float = 300.0) -> None:
        wait_until(lambda: self.sent >= mark or self.failure is not None, timeout)
        assert self.failure is None, self.failure

    def join(self, timeout: float = 600.0) -> None:
        self._thread.join(timeout)
        assert self.failure is None, self.failure

    def _run(self) -> None:
        try:
            producer = _producer(self.kafka, 5)
            topic = self.topics.raw(RAW_SOURCE)
            step = max(1, int(self.per_second / 20))
            while self.sent < len(self.records):
                with self._moved:
                    while self.sent >= self.limit:
                        self._moved.wait()
                    end = min(self.sent + step, self.limit)
                started = time.monotonic()
                for _source, key, value in self.records[self.sent : end]:
                    _send(producer, topic, key, value)
                producer.flush(30)
                delay = started + (end - self.sent) / self.per_second - time.monotonic()
                self.sent = end
                if delay > 0:
                    time.sleep(delay)
            assert producer.flush(120) == 0, "could not produce the traffic"
        except BaseException as exc:  # reported to the test thread
            self.failure = exc


# ---------------------------------------------------------------------------- reading
def drain(
    kafka: KafkaSettings, topic: str, idle_s: float = 2.0, timeout: float = 120.0
) -> list[Any]:
    """Every record of ``topic`` (JSON), read from the start until nothing came for ``idle_s``.

    Not up to the high watermark: Tansu reports it as the start of the last
    batch + 1 (FIELD-NOTES), which would cut the tail off.
    """
    consumer = Consumer(
        {
            **kafka.librdkafka(),
            "group.id": f"drain-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=10)
        partitions = metadata.topics[topic].partitions
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in partitions])
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        quiet_since = time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - quiet_since < idle_s:
            batch = consumer.consume(5000, 0.2)
            for message in batch:
                if message.error() is None:
                    out.append(jsonio.loads(message.value()))
            if batch:
                quiet_since = time.monotonic()
        return out
    finally:
        consumer.close()


# ---------------------------------------------------------------------------- accounting
@dataclass
class Accounting:
    produced: int = 0  # raw inputs: valid events + junk
    valid: int = 0
    journeys: int = 0  # distinct journey ids, closed ones
    open_journeys: int = 0
    in_journeys: int = 0  # sum of touchpoint counts over distinct journeys
    late: int = 0  # distinct event ids on the late topic
    dead: int = 0  # distinct refused inputs on the dead-letter topic
    signals: int = 0  # distinct signal ids
    alerts: int = 0  # distinct (alert id, state)
    duplicate_journeys: int = 0  # records sharing a journey id with an earlier one
    duplicate_late: int = 0
    duplicate_dead: int = 0
    duplicate_signals: int = 0
    duplicate_alerts: int = 0
    hidden: int = 0  # touchpoints counted but not listed (summaries keep the latest 50)
    problems: list[str] = field(default_factory=list)
    # (alert id, state) -> the alert record (the first of its duplicates).
    alert_by_key: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict, repr=False)
    # Distinct records by id, for comparing runs.
    closed: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    signal_by_id: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)
    late_by_id: dict[str, dict[str, Any]] = field(default_factory=dict, repr=False)

    @property
    def alert_keys(self) -> set[tuple[str, str, int]]:
        """(alert id, state, value) of every distinct alert."""
        return {(a["alert_id"], a["state"], a["value"]) for a in self.alert_by_key.values()}

    def figures(self) -> str:
        return (
            f"produced {self.produced:,} (valid {self.valid:,}); in journeys {self.in_journeys:,} "
            f"({self.journeys:,} closed + {self.open_journeys} open journeys, "
            f"{self.hidden:,} beyond the 50 listed); late {self.late:,}; dead {self.dead:,}; "
            f"signals {self.signals:,}; alerts {self.alerts:,}; duplicates by id: "
            f"journeys {self.duplicate_journeys:,}, late {self.duplicate_late:,}, "
            f"dead {self.duplicate_dead:,}, signals {self.duplicate_signals:,}, "
            f"alerts {self.duplicate_alerts:,}"
        )


def _problem(acc: Accounting, text: str) -> None:
    if len(acc.problems) < 50:
        acc.problems.append(text)


def _dedupe(
    acc: Accounting,
    records: list[dict[str, Any]],
    key: Callable[[dict[str, Any]], Any],
    same: Callable[[dict[str, Any]], Any],
    what: str,
) -> tuple[dict[Any, dict[str, Any]], int]:
    """Records by id; a repeated id must carry the same content (``same``)."""
    by_id: dict[Any, dict[str, Any]] = {}
    duplicates = 0
    for record in records:
        k = key(record)
        first = by_id.get(k)
        if first is None:
            by_id[k] = record
            continue
        duplicates += 1
        if same(first) != same(record):
            _problem(acc, f"{what} {k} published twice with different content")
    return by_id, duplicates


def account(
    traffic: Traffic,
    summaries: list[dict[str, Any]],
    late: list[dict[str, Any]],
    dead: list[dict[str, Any]],
    signals: list[dict[str, Any]],
    alerts: list[dict[str, Any]],
    open_journeys: list[dict[str, Any]],
) -> Accounting:
    """Where each produced event went; ``problems`` lists every inconsistency found."""
    acc = Accounting(produced=traffic.events, valid=len(traffic.valid))
    closed, acc.duplicate_journeys = _dedupe(
        acc, summaries, lambda s: s["journey_id"], lambda s: s, "journey"
    )
    live = {j["journey_id"]: j for j in open_journeys}
    for jid in set(live) & set(closed):
        _problem(acc, f"journey {jid} is both closed and still open")
    acc.journeys, acc.open_journeys = len(closed), len(live)
    acc.closed = closed
    where: dict[str, str] = {}
    for jid, journey in [*closed.items(), *live.items()]:
        listed = [tp["event_id"] for tp in journey["touchpoints"]]
        acc.in_journeys += journey["touchpoint_count"]
        acc.hidden += journey["touchpoint_count"] - len(listed)
        for event_id in listed:
            if event_id in where:
                _problem(acc, f"event {event_id} in journey {where[event_id]} and in {jid}")
            where[event_id] = jid
    late_by_id, acc.duplicate_late = _dedupe(
        acc, late, lambda r: r["event"]["event_id"], lambda r: r["event"], "late event"
    )
    acc.late = len(late_by_id)
    acc.late_by_id = late_by_id
    for event_id in late_by_id:
        if event_id in where:
            _problem(acc, f"event {event_id} is late and in journey {where[event_id]}")
        where[event_id] = "late"
    for event_id in set(where) - traffic.valid:
        _problem(acc, f"event {event_id} was never produced")
    missing = traffic.valid - set(where)
    if acc.in_journeys + acc.late != acc.valid:
        _problem(
            acc,
            f"{acc.in_journeys:,} in journeys + {acc.late:,} late != {acc.valid:,} valid events",
        )
    if len(missing) != acc.hidden:
        sample = sorted(missing)[:10]
        _problem(
            acc,
            f"{len(missing):,} events not listed anywhere, but only {acc.hidden:,} hidden by "
            f"truncation (e.g. {sample})",
        )
    not_late = traffic.late - set(late_by_id)
    if not_late:
        _problem(
            acc, f"events 2 h behind the stream not on the late topic: {sorted(not_late)[:10]}"
        )

    def marker(record: dict[str, Any]) -> str:
        payload = base64.b64decode(record["payload_b64"]).decode(errors="replace")
        found = [m for m in traffic.junk if f'"{m}"' in payload]
        return found[0] if found else f"?{payload[:80]}"

    dead_by_marker, acc.duplicate_dead = _dedupe(
        acc, dead, marker, lambda r: (r["reason"], r["payload_b64"]), "dead letter"
    )
    acc.dead = len(dead_by_marker)
    if set(dead_by_marker) != traffic.junk:
        _problem(
            acc,
            f"dead letters {sorted(set(dead_by_marker) ^ traffic.junk)[:10]} differ from the junk",
        )
    if acc.valid + len(traffic.junk) != acc.produced:
        _problem(acc, "traffic bookkeeping is inconsistent")

    signal_by_id, acc.duplicate_signals = _dedupe(
        acc, signals, lambda s: s["signal_id"], lambda s: s, "signal"
    )
    acc.signals = len(signal_by_id)
    acc.signal_by_id = signal_by_id
    for jid, journey in [*closed.items(), *live.items()]:
        for friction in journey["friction"]:
            if friction["signal_id"] not in signal_by_id:
                _problem(acc, f"signal {friction['signal_id']} of journey {jid} not published")
    alert_by_key, acc.duplicate_alerts = _dedupe(
        acc,
        alerts,
        lambda a: (a["alert_id"], a["state"]),
        lambda a: (a["value"], a["window"], a["affected_customers"]),
        "alert",
    )
    acc.alerts = len(alert_by_key)
    acc.alert_by_key = alert_by_key
    return acc


# ---------------------------------------------------------------------------- running
@dataclass
class Run:
    accounting: Accounting
    seconds: float
    log: list[str]
    # Touchpoints the last worker handled (replays included): after a kill -9
    # mid-stream, at least the part of the stream the killed worker had not reached.
    last_worker_touchpoints: int = 0


class Scenario:
    """One pipeline (fresh topics, ingest thread, worker processes) over ``traffic``."""

    def __init__(
        self, kafka: KafkaSettings, tmp: Path, traffic: Traffic, name: str | None = None
    ) -> None:
        self.kafka = kafka
        self.traffic = traffic
        self.name = name or uuid.uuid4().hex[:10]
        self.tmp = tmp / self.name
        self.tmp.mkdir(parents=True)
        self.topics = TopicSettings(prefix=f"t{self.name}.touchpoints", partitions=PARTITIONS)
        self.redis = RedisSettings(key_prefix=f"test:{self.name}:")
        self.pipeline: Pipeline | None = None
        self.started = time.monotonic()
        self.log: list[str] = []

    def note(self, text: str) -> None:
        line = f"{time.monotonic() - self.started:6.1f}s {text}"
        self.log.append(line)
        print(line, file=sys.stderr, flush=True)

    def start(self, backlog: bool) -> Pipeline:
        """Topics, then (``backlog``) the whole traffic, then ingest: a recorded file replayed."""
        ensure_topics(self.kafka, self.topics)
        if backlog:
            produce(self.kafka, self.topics, self.traffic.records)
            self.note(f"produced {self.traffic.events:,} raw records")
        p = Pipeline(self.kafka, self.topics, self.redis, self.name, self.tmp, **JOURNEY)
        p.env["TOUCHPOINT_REDIS_ENABLED"] = "false"
        self.pipeline = p
        return p

    def applied(self, workers: list[WorkerProcess]) -> int:
        """Touchpoints the live workers handled since they started (replays included)."""
        return sum((h or {}).get("touchpoints", 0) for h in (w.health() for w in workers))

    def settle(self, worker: WorkerProcess, timeout: float = 300.0) -> dict[str, Any]:
        """Wait for the closing events to be applied and everything applied to be flushed.

        Closing events close thousands of journeys at once; their summaries
        are delivered by the next flush, so quiet input is not enough.
        """
        assert self.pipeline is not None

        def closers_seen() -> bool:
            for key in self.traffic.closers:
                status, body = worker.journey(key)
                if status != 200 or not body.get("live"):
                    return False
            return True

        wait_until(closers_seen, timeout, interval=1.0)
        last: list[Any] = [None]
        since: list[float] = [time.monotonic()]
        seen: dict[str, Any] = {}

        def done() -> bool:
            try:
                stats = worker.stats()
            except (httpx.HTTPError, ValueError):
                return False
            seen.update(stats)
            now = (stats["touchpoints"], stats["bundles"], stats["alerts_sent"])
            if now != last[0] or stats["flushed_touchpoints"] != stats["touchpoints"]:
                last[0], since[0] = now, time.monotonic()
                return False
            return time.monotonic() - since[0] >= 3.0

        wait_until(done, timeout, interval=0.5)
        self.note("settled: closers applied, nothing new for 3 s, all of it flushed")
        return seen

    def collect(self, worker: WorkerProcess) -> Accounting:
        topics = self.topics
        summaries = drain(self.kafka, topics.journeys)
        late = drain(self.kafka, topics.late)
        dead = drain(self.kafka, topics.deadletter)
        signals = drain(self.kafka, topics.friction)
        alerts = drain(self.kafka, topics.alerts)
        self.note(f"read {len(summaries):,} journey summaries and the other outputs")
        # Open journeys: the closers' and those of any customer whose events are
        # not listed in a summary or on the late topic (looked up on the worker).
        listed = {tp["event_id"] for s in summaries for tp in s["touchpoints"]}
        listed |= {r["event"]["event_id"] for r in late}
        keys = set(self.traffic.closers)
        keys |= {self.traffic.key_of[e] for e in self.traffic.valid - listed}
        if len(keys) > MAX_LOOKUPS:
            # After the closing events only journeys of > 50 touchpoints keep
            # events out of the lists; thousands of keys mean journeys stayed open.
            self.note(f"{len(keys):,} customers have unlisted events; looking up {MAX_LOOKUPS}")
            keys = set(self.traffic.closers) | set(sorted(keys)[:MAX_LOOKUPS])
        open_journeys: dict[str, dict[str, Any]] = {}
        for key in sorted(keys):
            status, body = worker.journey(key)
            if status == 200:
                for journey in body["live"]:
                    open_journeys[journey["journey_id"]] = journey
        self.note(f"looked up {len(keys):,} customers: {len(open_journeys)} open journeys")
        return account(
            self.traffic, summaries, late, dead, signals, alerts, list(open_journeys.values())
        )

    def close(self) -> None:
        if self.pipeline is not None:
            self.pipeline.close()


def run_crash(
    kafka: KafkaSettings, tmp: Path, traffic: Traffic, *, crash_at: tuple[float, ...] = (0.4,)
) -> Run:
    """One worker over the traffic as a backlog; ``kill -9`` at each ``crash_at`` share, restart.

    An empty ``crash_at`` is the undisturbed reference run.
    """
    s = Scenario(kafka, tmp, traffic)
    try:
        p = s.start(backlog=True)
        worker = p.worker()
        worker.wait_ready(partitions=PARTITIONS)
        s.note("worker ready")
        done = 0  # touchpoints handled by the workers killed so far
        for share in crash_at:
            target = int(traffic.events * share) - done
            wait_until(lambda: s.applied([worker]) >= target, 180, interval=0.02)  # noqa: B023
            applied = s.applied([worker])
            worker.kill()
            done += applied
            s.note(f"kill -9 after {applied:,} touchpoints")
            worker = p.worker()
            worker.wait_ready(partitions=PARTITIONS)
            s.note("restarted worker ready")
        stats = s.settle(worker)
        acc = s.collect(worker)
        return Run(acc, time.monotonic() - s.started, s.log, stats["touchpoints"])
    finally:
        s.close()


def run_rebalance(
    kafka: KafkaSettings, tmp: Path, traffic: Traffic, *, per_second: float = 2_500.0
) -> Run:
    """Live-paced traffic; worker B joins, leaves (SIGTERM); worker C joins, is killed (-9).

    Worker A must each time take all partitions over and carry on. A tenth
    of the traffic goes through before and during each change.
    """
    s = Scenario(kafka, tmp, traffic)
    try:
        p = s.start(backlog=False)
        a = p.worker()
        a.wait_ready(partitions=PARTITIONS)
        s.note("worker A ready")
        pacer = Pacer(kafka, s.topics, traffic.records, per_second)
        share = traffic.events // 10

        def split(x: WorkerProcess, y: WorkerProcess) -> bool:
            hx, hy = x.health(), y.health()
            return bool(
                hx
                and hy
                and hx["ready"]
                and hy["ready"]
                and hx["partitions"]
                and hy["partitions"]
                and len(hx["partitions"]) + len(hy["partitions"]) == PARTITIONS
            )

        def alone(x: WorkerProcess) -> bool:
            hx = x.health()
            return bool(hx and hx["ready"] and len(hx["partitions"]) == PARTITIONS)

        def change(what: str, act: Callable[[], Any], done: Callable[[Any], bool]) -> Any:
            pacer.wait_sent(pacer.allow(share))  # traffic before the change
            result = act()
            pacer.allow(share)  # and during it
            s.note(f"{what} ({pacer.sent:,} records sent)")
            wait_until(lambda: done(result), 180)
            s.note(f"  done ({pacer.sent:,} records sent)")
            return result

        b = change("worker B starts", p.worker, lambda b: split(a, b))
        change("worker B gets SIGTERM", b.stop, lambda _: alone(a))
        c = change("worker C starts", p.worker, lambda c: split(a, c))
        change("worker C gets SIGKILL", c.kill, lambda _: alone(a))
        pacer.allow(traffic.events)
        pacer.join()
        s.note("all traffic sent")
        stats = s.settle(a)
        acc = s.collect(a)
        return Run(acc, time.monotonic() - s.started, s.log, stats["touchpoints"])
    finally:
        s.close()


def _journey_content(summary: dict[str, Any]) -> dict[str, Any]:
    # "duplicates" counts redelivered events the journey dropped: ingest and
    # the collector deliver at least once, so redeliveries vary from run to run.
    return {k: v for k, v in summary.items() if k != "duplicates"}


def compare(
    traffic: Traffic, disturbed: Accounting, reference: Accounting, *, alerts: bool = True
) -> list[str]:
    """Differences between a disturbed run and an undisturbed run of the same input.

    Journeys (whole summaries), late events and friction signals of every key
    that identity stitching does not involve must be the same, ids included.
    Alerts count everyone's signals, stitched customers' too, so they are
    compared only for runs that read the input the same way (both a backlog),
    and only the records (alert id, state) whose windows, in both runs, hold
    no stitched customer's signal (:func:`_comparable_alerts`): there they
    must be the same, values included. Stitching items go through Kafka, and
    when they arrive depends on it (the event time of an absence or threshold
    signal can move with it), so a stitched signal can change a window's
    count. The differences examined on 2026-12-05 late were not that: the
    distinct signals per minute, stitched customers' included, were the
    same in both runs, and the alerting stage had counted fewer than the
    friction topic holds in some windows after the crash (a fault in it,
    see the README's Reliability section; e5dca5a fixed one way to lose
    counts). The problem reported lists the signals per minute so the two
    causes can be told apart.
    """
    problems = []

    def kept(by_id: dict[str, dict[str, Any]], key: Callable[[dict[str, Any]], str]) -> dict:
        return {k: v for k, v in by_id.items() if key(v) not in traffic.stitched}

    for what, a, b, same in (
        ("journeys", disturbed.closed, reference.closed, _journey_content),
        ("late events", disturbed.late_by_id, reference.late_by_id, lambda r: r["event"]),
        ("signals", disturbed.signal_by_id, reference.signal_by_id, lambda r: r),
    ):
        key = (lambda r: r["key"]) if what == "late events" else (lambda r: r["customer_id"])
        mine, theirs = kept(a, key), kept(b, key)
        lost, extra = sorted(set(theirs) - set(mine)), sorted(set(mine) - set(theirs))
        changed = sorted(k for k in set(mine) & set(theirs) if same(mine[k]) != same(theirs[k]))
        if lost or extra or changed:
            fields = sorted(
                {f for k in changed for f in mine[k] if mine[k].get(f) != theirs[k].get(f)}
            )
            problems.append(
                f"{what} of unstitched customers differ from the undisturbed run: "
                f"{len(lost)} missing (e.g. {lost[:3]}), {len(extra)} extra (e.g. {extra[:3]}), "
                f"{len(changed)} changed (e.g. {changed[:3]}, in {fields})"
            )
    if alerts:
        mine, theirs = _comparable_alerts(traffic, disturbed, reference)
        if mine != theirs:
            ids = [{(i, state) for i, state, _value in run} for run in (mine, theirs)]
            what = "alerts" if ids[0] != ids[1] else "alert values"
            rule_of = {
                a["alert_id"]: a["rule"]
                for run in (disturbed, reference)
                for a in run.alert_by_key.values()
            }
            rules = {rule_of[i] for i, _state, _value in mine ^ theirs}
            problems.append(
                f"{what} differ (this run, then the undisturbed one): "
                f"{sorted(mine - theirs)[:10]} / {sorted(theirs - mine)[:10]}; "
                f"distinct signals of {sorted(rules)} per minute, this run / undisturbed "
                f"(stitched customers' in brackets): "
                f"{_signal_minutes(traffic, disturbed, rules)} / "
                f"{_signal_minutes(traffic, reference, rules)}"
            )
        elif reference.alert_keys and not theirs:
            problems.append("no alert to compare: stitched signals fall in every alert's windows")
    return problems


def _signal_minutes(traffic: Traffic, run: Accounting, rules: set[str]) -> dict[str, str]:
    """'count [stitched count]' of distinct signals per minute of the given rules (diagnosis)."""
    counts: Counter[str] = Counter()
    stitched: Counter[str] = Counter()
    for s in run.signal_by_id.values():
        if s["rule"] in rules:
            minute = s["occurred_at"][:16]
            counts[minute] += 1
            stitched[minute] += s["customer_id"] in traffic.stitched
    return {m: f"{counts[m]} [{stitched[m]}]" for m in sorted(counts)}


def _comparable_alerts(traffic: Traffic, *runs: Accounting) -> list[set[tuple[str, str, int]]]:
    """Each run's (alert id, state, value) of the records no stitched customer's signal touches.

    A record (an alert id in one state) is judged over the windows every run
    reports for it, from the earliest start to the latest end: a stitched
    signal can move the value an alert fires with, and the window it
    resolves in. In the 50k-event crash scenario, 3 of its 10 alerts'
    records are compared.
    """
    stitched = [
        (s["rule"], s["channel"], datetime.fromisoformat(s["occurred_at"]))
        for run in runs
        for s in run.signal_by_id.values()
        if s["customer_id"] in traffic.stitched
    ]
    spans: dict[tuple[str, str], tuple[str, str, datetime, datetime]] = {}
    for run in runs:
        for a in run.alert_by_key.values():
            record = (a["alert_id"], a["state"])
            start = datetime.fromisoformat(a["window"]["start"])
            end = datetime.fromisoformat(a["window"]["end"])
            known = spans.get(record)
            if known is not None:
                start, end = min(start, known[2]), max(end, known[3])
            spans[record] = (a["rule"], a["channel"], start, end)
    involved = {
        record
        for record, (rule, channel, start, end) in spans.items()
        if any(r == rule and channel in (c, "all") and start <= at < end for r, c, at in stitched)
    }
    return [
        {
            (a["alert_id"], a["state"], a["value"])
            for a in run.alert_by_key.values()
            if (a["alert_id"], a["state"]) not in involved
        }
        for run in runs
    ]


def window_counts(acc: Accounting) -> Counter[tuple[str, str]]:
    """Distinct signals per rule and minute of event time (what spike alerts count)."""
    return Counter((r["rule"], r["occurred_at"][:16]) for r in acc.signal_by_id.values())


# ---------------------------------------------------------------------------- CLI
def _broker() -> Iterator[KafkaSettings]:
    from touchpoint.broker import EmbeddedBroker

    log = Path(tempfile.mkdtemp(prefix="tansu-")) / "tansu.log"
    with EmbeddedBroker(log_path=log) as broker:
        yield KafkaSettings(bootstrap_servers=broker.bootstrap, session_timeout_ms=6_000)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.reliability", description=__doc__)
    parser.add_argument("scenario", choices=("crash", "rebalance"))
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--crash-at", type=float, nargs="*", default=[0.4], help="kill -9 at these shares"
    )
    parser.add_argument("--no-reference", action="store_true", help="skip the undisturbed run")
    parser.add_argument("--rate", type=float, default=2_500.0, help="rebalance: records/s sent")
    args = parser.parse_args(argv)
    started = time.monotonic()
    traffic = build_traffic(args.events, args.seed)
    print(
        f"traffic: {traffic.events:,} raw records ({len(traffic.valid):,} valid, "
        f"{len(traffic.late)} injected late, {len(traffic.junk)} junk), built in "
        f"{time.monotonic() - started:.1f}s"
    )
    tmp = Path(tempfile.mkdtemp(prefix="reliability-"))
    failed = False
    for kafka in _broker():
        if args.scenario == "crash":
            run = run_crash(kafka, tmp, traffic, crash_at=tuple(args.crash_at))
        else:
            run = run_rebalance(kafka, tmp, traffic, per_second=args.rate)
        print(f"{args.scenario}: {run.accounting.figures()}  [{run.seconds:.0f}s]")
        print(f"  the last worker handled {run.last_worker_touchpoints:,} touchpoints")
        for problem in run.accounting.problems:
            print(f"  PROBLEM {problem}")
        failed = bool(run.accounting.problems)
        if not args.no_reference:
            ref = run_crash(kafka, tmp, traffic, crash_at=())
            print(f"reference (undisturbed): {ref.accounting.figures()}  [{ref.seconds:.0f}s]")
            for problem in ref.accounting.problems + compare(
                traffic, run.accounting, ref.accounting, alerts=args.scenario == "crash"
            ):
                print(f"  PROBLEM {problem}")
                failed = True
            mine, theirs = window_counts(run.accounting), window_counts(ref.accounting)
            differ = sorted(k for k in set(mine) | set(theirs) if mine[k] != theirs[k])
            print(
                f"signals per (rule, minute): {len(differ)} of {len(set(mine) | set(theirs))} "
                f"differ, e.g. {[(k, mine[k], theirs[k]) for k in differ[:5]]}"
            )
            same = run.accounting.alert_keys & ref.accounting.alert_keys
            print(
                f"alerts (id, state, value): {len(same)} the same, "
                f"{len(run.accounting.alert_keys - same)} only here, "
                f"{len(ref.accounting.alert_keys - same)} only in the reference"
            )
            compared, _ = _comparable_alerts(traffic, run.accounting, ref.accounting)
            print(
                f"  alert records compared by value (no stitched signal in their windows): {len(compared)}"
            )
    print(f"logs and worker output in {tmp}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
