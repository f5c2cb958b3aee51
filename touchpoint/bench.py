"""Benchmark: the raw confluent-kafka ceiling against Touchpoint's stages, same data, same run.

Absolute figures drift from machine to machine and run to run; the ratio to
the raw client measured in the same run is what the targets are set against.
Timing of each stage starts at its first message (group joins excluded) and
ends when its last output is delivered.
"""

from __future__ import annotations

import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import Consumer, Producer

from streams.ingest import IngestWorker
from touchpoint import jsonio
from touchpoint.broker import EmbeddedBroker
from touchpoint.config import IngestSettings, KafkaSettings, Settings, TopicSettings
from touchpoint.producer import producer_config
from touchpoint.simulator import Simulator
from touchpoint.topics import ensure_topics


@dataclass
class BenchResult:
    events: int
    partitions: int
    broker: str
    payload_bytes_avg: float
    produce_eps: float
    raw_eps: list[float] = field(default_factory=list)
    ingest_eps: list[float] = field(default_factory=list)
    ingest_rejected: int = 0
    journeys_eps: float = 0.0
    end_to_end_eps: float = 0.0
    worker_stats: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def raw_best(self) -> float:
        return max(self.raw_eps)

    @property
    def ingest_median(self) -> float:
        return statistics.median(self.ingest_eps)


def _preproduce(kafka: KafkaSettings, topics: TopicSettings, events: int) -> tuple[float, float]:
    """Write ``events`` simulated events to the raw topics; returns (events/s, mean size).

    50 events/s of simulated time: 200k events span ~67 minutes of event time,
    so journeys open and close (30-minute gap) throughout, as in production.
    """
    start_ms = int(time.time() * 1000) - 24 * 3600 * 1000
    sim = Simulator(seed=42, start_ms=start_ms, rate=50.0, customers=20_000)
    encoded = []
    for source, event in sim.take(events):
        key = event.get("customer_id") or event["anonymous_id"]
        encoded.append((topics.raw(source), key.encode(), jsonio.dumps(event)))
    producer = Producer(producer_config(kafka, **{"linger.ms": 20}))
    started = time.perf_counter()
    for topic, key, value in encoded:
        while True:
            try:
                producer.produce(topic, value, key=key)
                break
            except BufferError:
                producer.poll(0.05)
    if producer.flush(120):
        raise RuntimeError("could not pre-produce the benchmark data")
    elapsed = time.perf_counter() - started
    return events / elapsed, sum(len(v) for _t, _k, v in encoded) / len(encoded)


def measure_raw(kafka: KafkaSettings, topics: TopicSettings, events: int) -> float:
    """confluent-kafka consume(1000) + orjson decode + a per-customer dict update."""
    consumer = Consumer(kafka.librdkafka_consumer(f"bench-raw-{uuid.uuid4().hex[:8]}"))
    consumer.subscribe(list(topics.raw_topics))
    per_customer: Counter[str | None] = Counter()
    seen = 0
    started = None
    try:
        while seen < events:
            batch = consumer.consume(1000, 1.0)
            if batch and started is None:
                started = time.perf_counter()
            for message in batch:
                if message.error() is None:
                    doc = jsonio.loads(message.value())  # type: ignore[arg-type]
                    per_customer[doc.get("customer_id")] += 1
                    seen += 1
        assert started is not None
        return events / (time.perf_counter() - started)
    finally:
        consumer.close()


def measure_ingest(kafka: KafkaSettings, topics: TopicSettings, events: int) -> tuple[float, int]:
    """The ingest stage over the same raw data: (events/s, rejected)."""
    settings = IngestSettings(group_id=f"bench-ingest-{uuid.uuid4().hex[:8]}")
    worker = IngestWorker(kafka, topics, settings, create_topics=False)
    started = None
    try:
        while worker.released_total + worker.rejected_total < events:
            read = worker.run_once()  # consume timeout as in `touchpoint ingest`
            if read and started is None:
                started = time.perf_counter()
        worker.producer.flush(60)  # delivered, not just sent
        assert started is not None
        return events / (time.perf_counter() - started), worker.rejected_total
    finally:
        worker.close()


class _Worker:
    """A ``touchpoint worker`` subprocess configured for the benchmark."""

    def __init__(
        self, kafka: KafkaSettings, topics: TopicSettings, app_id: str, datadir: str
    ) -> None:
        from touchpoint.broker import free_port

        self.port = free_port()
        self.env = {
            **os.environ,
            "TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "TOUCHPOINT_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
            "TOUCHPOINT_TOPICS_PREFIX": topics.prefix,
            "TOUCHPOINT_TOPICS_PARTITIONS": str(topics.partitions),
            "TOUCHPOINT_WORKER_APP_ID": app_id,
            "TOUCHPOINT_WORKER_WEB_PORT": str(self.port),
            "TOUCHPOINT_WORKER_DATA_DIR": datadir,
            "TOUCHPOINT_REDIS_KEY_PREFIX": f"bench:{app_id}:",
        }
        self.log = open(os.path.join(datadir, f"{app_id}.log"), "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            [sys.executable, "-m", "touchpoint", "worker"],
            env=self.env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )

    def get(self, path: str) -> dict[str, Any] | None:
        import httpx

        try:
            response = httpx.get(f"http://127.0.0.1:{self.port}{path}", timeout=5)
            return response.json() if response.status_code == 200 else None
        except httpx.HTTPError:
            return None

    def wait(self, check: Any, timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"worker exited while waiting for {what}; log: {self.log.name}")
            stats = self.get("/stats")
            if stats is not None and check(stats):
                return stats
            time.sleep(0.1)
        raise RuntimeError(f"timed out waiting for {what}; log: {self.log.name}")

    def ready(self, partitions: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            health = self.get("/health")
            if health and health["ready"] and len(health["partitions"]) == partitions:
                return
            time.sleep(0.2)
        raise RuntimeError(f"worker not ready after {timeout} s; log: {self.log.name}")

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


def _clear_redis(prefix: str) -> None:
    import redis

    try:
        client = redis.Redis.from_url("redis://127.0.0.1:6379/0")
        for key in client.scan_iter(match=f"{prefix}*", count=1000):
            client.delete(key)
    except redis.RedisError:
        pass


def measure_journeys(
    kafka: KafkaSettings, topics: TopicSettings, touchpoints: int, datadir: str
) -> tuple[float, dict[str, Any]]:
    """The journey worker alone, over bundles already on the validated topic."""
    app_id = f"bench-j-{uuid.uuid4().hex[:6]}"
    worker = _Worker(kafka, topics, app_id, datadir)
    try:
        stats = worker.wait(
            lambda s: s["flushed_touchpoints"] >= touchpoints, 600, "the journey stage"
        )
        return touchpoints / (stats["last_flush_at"] - stats["first_bundle_at"]), stats
    finally:
        worker.stop()
        _clear_redis(f"bench:{app_id}:")


def measure_end_to_end(
    kafka: KafkaSettings, topics: TopicSettings, events: int, datadir: str
) -> tuple[float, dict[str, Any]]:
    """Raw topics -> ingest process -> worker process (journeys, state, Redis, outputs)."""
    app_id = f"bench-e-{uuid.uuid4().hex[:6]}"
    worker = _Worker(kafka, topics, app_id, datadir)
    ingest = None
    try:
        worker.ready(topics.partitions)
        ingest = subprocess.Popen(
            [sys.executable, "-m", "touchpoint", "--log-level", "warning", "ingest"],
            env={**worker.env, "TOUCHPOINT_INGEST_GROUP_ID": f"{app_id}-ingest"},
            stdout=worker.log,
            stderr=subprocess.STDOUT,
        )
        stats = worker.wait(lambda s: s["flushed_touchpoints"] >= events, 600, "end to end")
        return events / (stats["last_flush_at"] - stats["first_bundle_at"]), stats
    finally:
        if ingest is not None:
            ingest.send_signal(signal.SIGTERM)
            ingest.wait(30)
        worker.stop()
        _clear_redis(f"bench:{app_id}:")


def run_benchmark(
    settings: Settings,
    *,
    events: int = 200_000,
    partitions: int = 4,
    repeat: int = 1,
    json_out: str | None = None,
) -> BenchResult:
    embedded = None
    if os.environ.get("TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS"):
        kafka = settings.kafka
        broker_name = kafka.bootstrap_servers
    else:
        embedded = EmbeddedBroker().start()
        kafka = KafkaSettings(bootstrap_servers=embedded.bootstrap, session_timeout_ms=6_000)
        broker_name = f"embedded Tansu at {embedded.bootstrap}"
    try:
        topics = TopicSettings(
            prefix=f"bench{uuid.uuid4().hex[:6]}.touchpoints", partitions=partitions
        )
        ensure_topics(kafka, topics)
        print(f"pre-producing {events:,} simulated events to {partitions} partitions per topic ...")
        produce_eps, size = _preproduce(kafka, topics, events)
        result = BenchResult(events, partitions, broker_name, round(size, 1), round(produce_eps))
        for _ in range(repeat):
            result.raw_eps.append(round(measure_raw(kafka, topics, events)))
            eps, rejected = measure_ingest(kafka, topics, events)
            result.ingest_eps.append(round(eps))
            result.ingest_rejected = rejected
        datadir = tempfile.mkdtemp(prefix="touchpoint-bench-")
        try:
            # (c) on the bundles the last ingest run wrote (the first runs' copies
            # are duplicates the worker drops, so only one run's worth is written).
            print("running the journey worker on the ingested bundles ...")
            eps, _stats = measure_journeys(kafka, topics, events - result.ingest_rejected, datadir)
            result.journeys_eps = round(eps)
            # (d) fresh topics, same data: ingest and worker processes concurrently.
            print("running raw topics -> ingest -> worker end to end ...")
            e2e_topics = TopicSettings(
                prefix=f"bench{uuid.uuid4().hex[:6]}.touchpoints", partitions=partitions
            )
            ensure_topics(kafka, e2e_topics)
            _preproduce(kafka, e2e_topics, events)
            eps, stats = measure_end_to_end(kafka, e2e_topics, events, datadir)
            result.end_to_end_eps = round(eps)
            result.worker_stats = stats
        except Exception:
            print(f"benchmark failed; worker logs kept in {datadir}")
            raise
        else:
            shutil.rmtree(datadir, ignore_errors=True)
        _report(result)
        if json_out:
            with open(json_out, "wb") as out:
                out.write(jsonio.dumps_pretty(asdict(result)))
        return result
    finally:
        if embedded is not None:
            embedded.stop()


def _report(result: BenchResult) -> None:
    ratio = result.ingest_median / result.raw_best
    lines = [
        "",
        f"Touchpoint benchmark: {result.events:,} events (avg {result.payload_bytes_avg} B), "
        f"{result.partitions} partitions, {result.broker}",
        f"  pre-produce (confluent-kafka, idempotent)      {result.produce_eps:>10,.0f} events/s",
        f"  (a) raw ceiling: consume + orjson + dict       {result.raw_best:>10,.0f} events/s   runs {result.raw_eps}",
        f"  (b) ingest: decode+validate+bundle+deliver     {result.ingest_median:>10,.0f} events/s   runs {result.ingest_eps}",
        f"  ingest / raw ceiling                           {ratio:>10.2f}   (target >= 0.50)",
        f"  rejected by ingest (simulated data is valid)   {result.ingest_rejected:>10,}",
    ]
    if result.end_to_end_eps:
        stats = result.worker_stats
        counts = stats.get("counts", {})
        sizes = stats.get("state_bytes_by_touchpoints", {})
        at20 = sizes.get("20") or sizes.get(20)
        ratio_e2e = result.end_to_end_eps / result.raw_best
        lines += [
            f"  (c) journey worker alone (bundles -> state)    {result.journeys_eps:>10,.0f} events/s",
            f"  (d) end to end: raw -> ingest -> journeys,     {result.end_to_end_eps:>10,.0f} events/s"
            "   (target >= 50,000)",
            "      state (rocksdb), changelog, Redis, outputs",
            f"  end to end / raw ceiling                       {ratio_e2e:>10.2f}   (target >= 0.25)",
            f"  changelog records per event                    {counts.get('changelog_records', 0) / result.events:>10.3f}",
            f"  state bytes per live journey of 20 touchpoints {at20 or 0:>10}   (target <= 2048)",
            f"  journeys closed / duplicates dropped           {counts.get('closed', 0):>10,} / {counts.get('duplicates', 0):,}",
            f"  Redis journey writes                           {stats.get('redis_written', 0):>10,}",
        ]
        if stats.get("bundles"):
            # Faust's cost is per message: this says how far bundling amortises it.
            lines.append(
                f"  touchpoints per bundle the worker read         "
                f"{stats.get('touchpoints', 0) / stats['bundles']:>10,.0f}"
            )
    print("\n".join(lines))
