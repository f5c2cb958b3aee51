"""Outages of the broker and of Redis while the pipeline runs (issue 6, SPEC §10).

Broker: a dedicated embedded broker (Tansu) is stopped mid-stream and started
again ~30 s later. Tansu keeps everything in memory, so topics, committed
offsets, consumer groups and producer ids are gone after the restart: what was
stored before the outage is lost with it (real, replicated Kafka keeps it; see
the README's "Reliability" section). What must hold: the producer buffers what
is sent during the outage and delivers it afterwards, ingest recovers in place,
the worker either recovers or exits (never hangs) and comes back under a
supervisor, and every event sent from the outage on ends up in a journey.

Redis: a private ``redis-server`` is frozen (SIGSTOP) while the worker
processes a stream, then thawed, then restarted empty. Processing must go on,
the buffer must stay within its bound, metrics and logs must say what happened,
and afterwards the Redis mirror must match the worker's live lookups again.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.events import event, page_view
from tests.pipeline import Pipeline, WorkerProcess, wait_until
from touchpoint.broker import EmbeddedBroker, free_port, wait_for_port
from touchpoint.config import KafkaSettings, RedisSettings, TopicSettings
from touchpoint.topics import ensure_topics

OUTAGE_S = 30.0


def now_ms() -> int:
    return int(time.time() * 1000)


def samples(worker: WorkerProcess) -> list[Sample]:
    """Every sample on the worker's /metrics (none when it does not answer)."""
    try:
        text = httpx.get(f"{worker.url}/metrics", timeout=5).text
    except httpx.HTTPError:
        return []
    return [sample for family in text_string_to_metric_families(text) for sample in family.samples]


def scrape(worker: WorkerProcess) -> dict[str, float]:
    """The worker's unlabelled (and summed labelled) metric samples, by sample name."""
    out: dict[str, float] = {}
    for sample in samples(worker):
        out[sample.name] = out.get(sample.name, 0.0) + sample.value
    return out


def live_journey(worker: WorkerProcess, customer: str) -> dict[str, Any] | None:
    """The customer's newest live journey from the worker's lookup, or None."""
    try:
        status, body = worker.journey(customer)
    except httpx.HTTPError:
        return None
    if status != 200 or not body["live"]:
        return None
    return body["live"][-1]  # type: ignore[no-any-return]


class Supervisor:
    """Restarts the pipeline's worker whenever it exits, as a deployment would."""

    def __init__(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        self.current = pipeline.worker()
        self.exits: list[tuple[int, Path]] = []  # (exit status, log of that run)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            process = self.current.process
            assert process is not None
            if process.poll() is not None:
                self.exits.append((process.returncode, self.current.log_path))
                time.sleep(1.0)  # a supervisor's restart delay
                self.current = self.pipeline.worker()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


# ---------------------------------------------------------------- broker outage


def kafka_up(worker: WorkerProcess, client: str) -> float | None:
    """touchpoint_kafka_up{client=...} on the worker's /metrics (None: no series or no answer)."""
    for sample in samples(worker):
        if sample.name == "touchpoint_kafka_up" and sample.labels.get("client") == client:
            return sample.value
    return None


def test_broker_outage_and_restart(
    own_broker: EmbeddedBroker,
    topics: TopicSettings,
    redis_settings: RedisSettings,
    unique: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    kafka = KafkaSettings(bootstrap_servers=own_broker.bootstrap, session_timeout_ms=6_000)
    p = Pipeline(kafka, topics, redis_settings, unique, tmp_path)
    supervisor = Supervisor(p)
    try:
        supervisor.current.wait_ready(partitions=topics.partitions)

        # Before: the pipeline works.
        p.send(*(page_view(f"pre-{i}", customer_id=f"pre-{i}", ts=now_ms()) for i in range(8)))
        wait_until(lambda: live_journey(supervisor.current, "pre-7"), 60)
        # Both of the worker's Kafka clients report the broker as reachable: the
        # output producer (librdkafka statistics) and Faust's consumer (aiokafka).
        first = supervisor.current
        wait_until(lambda: kafka_up(first, "worker_consumer") == 1, 30)
        wait_until(lambda: kafka_up(first, "worker_output") == 1, 30)

        # Mid-stream: events keep coming while the broker is away. The producer
        # only queues them (send never blocks on the broker).
        own_broker.stop()
        during: list[str] = []
        stream_started = time.monotonic()
        consumer_down_seen = False
        while time.monotonic() - stream_started < OUTAGE_S:
            customer = f"during-{len(during)}"
            assert p.producer.send(page_view(customer, customer_id=customer, ts=now_ms())) is None
            during.append(customer)
            time.sleep(1.0)
            consumer_down_seen = consumer_down_seen or kafka_up(first, "worker_consumer") == 0
        # The worker outlives the first seconds of an outage (its flush waits up
        # to 60 s for delivery), long enough to report its consumer cut off.
        assert consumer_down_seen, "worker_consumer never reported the broker down"
        # Nothing was delivered meanwhile, and nothing died.
        assert p.producer.flush(1) > 0
        assert p._thread.is_alive(), "ingest died during the outage"

        # The broker comes back empty (memory storage): topics are re-created,
        # as `touchpoint topics create` would be.
        own_broker.start()
        ensure_topics(kafka, topics)
        after = [f"after-{i}" for i in range(8)]
        for customer in after:
            assert p.producer.send(page_view(customer, customer_id=customer, ts=now_ms())) is None

        # The producer delivers what it buffered, without being told to.
        assert p.producer.flush(120) == 0, "producer did not recover after the broker restart"

        # Every event from the outage on ends in a journey, via ingest and a
        # worker that recovered or was restarted (a hung worker fails here).
        def all_processed() -> bool:
            return all(live_journey(supervisor.current, c) for c in during + after)

        wait_until(all_processed, 240, interval=1.0)
        for customer in during + after:
            journey = live_journey(supervisor.current, customer)
            assert journey is not None and journey["touchpoint_count"] == 1, (customer, journey)

        # Everything is up; nothing is crash-looping.
        assert p._thread.is_alive(), "ingest died"
        assert supervisor.current.process is not None
        assert supervisor.current.process.poll() is None
        assert len(supervisor.exits) <= 2, supervisor.exits
        for status, log_path in supervisor.exits:
            # A worker that gives up exits with a failure status after saying why.
            assert status != 0, log_path.read_text(errors="replace")[-3000:]
            assert "could not deliver state/outputs" in log_path.read_text(errors="replace")
        current_log = supervisor.current.log_tail()
        assert "Traceback" not in current_log and "Crashed" not in current_log, current_log

        # The outage is on record in every process's log.
        warned = {r.name for r in caplog.records if r.levelno >= logging.WARNING}
        assert "streams.ingest" in warned, caplog.text
        assert "touchpoint.producer" in warned, caplog.text
        first_log = p.workers[0].log_path.read_text(errors="replace")
        assert "Unable connect to node" in first_log or "could not deliver" in first_log
    finally:
        supervisor.stop()
        p.close()


# ---------------------------------------------------------------- Redis outage


class PrivateRedis:
    """A throwaway redis-server (no persistence) on a free port."""

    def __init__(self, log_path: Path) -> None:
        self.port = free_port()
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> PrivateRedis:
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(
            [
                *("redis-server", "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no"),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        wait_for_port("127.0.0.1", self.port)
        return self

    def signal(self, sig: int) -> None:
        assert self.process is not None
        os.kill(self.process.pid, sig)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)
            self.process.kill()
            self.process.wait(10)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path / "redis.log").start()
    yield server
    server.stop()


MAX_PENDING = 40


def test_redis_outage_buffer_bound_and_catch_up(
    kafka: KafkaSettings,
    topics: TopicSettings,
    private_redis: PrivateRedis,
    unique: str,
    tmp_path: Path,
) -> None:
    settings = RedisSettings(url=private_redis.url, key_prefix=f"test:{unique}:")
    client = redis.Redis.from_url(settings.url, socket_timeout=5)
    # Store journeys close 6 s (+1 s grace) after their last event; web journeys stay open.
    p = Pipeline(
        kafka,
        topics,
        settings,
        unique,
        tmp_path,
        gap_minutes="0.1",
        channel_gap_minutes="web=30",
        grace_minutes="0.0167",
    )
    p.env["TOUCHPOINT_REDIS_URL"] = settings.url
    p.env["TOUCHPOINT_REDIS_MAX_PENDING"] = str(MAX_PENDING)
    worker = p.worker()

    def key(customer: str) -> str:
        return f"{settings.key_prefix}journey:{customer}"

    def mirrored(customer: str) -> dict[str, Any] | None:
        import orjson

        raw = client.get(key(customer))
        return orjson.loads(raw) if raw else None

    def web(customer: str, n: int) -> dict[str, Any]:
        return page_view(f"{customer}-{n}", customer_id=customer, ts=now_ms())

    try:
        worker.wait_ready(partitions=topics.partitions)
        # Redis up: live journeys appear in the mirror.
        # Live customers stay within the buffer (a resync must fit in it); live
        # plus closed ones (deletes) during the outage do not.
        web_customers = [f"web-{i}" for i in range(10)]
        store_customers = [f"store-{i}" for i in range(20)]
        p.send(*(web(c, 0) for c in web_customers))
        p.send(
            *(
                event(
                    "store_visit",
                    f"{c}-0",
                    customer_id=c,
                    channel="store",
                    ts=now_ms(),
                    store_id="s-1",
                )
                for c in store_customers
            )
        )
        wait_until(lambda: all(mirrored(c) for c in web_customers + store_customers), 60)
        assert scrape(worker)["touchpoint_redis_up"] == 1

        # Redis hangs (SIGSTOP: connections are accepted, nothing answers).
        private_redis.signal(signal.SIGSTOP)
        new_customers = [f"new-{i}" for i in range(20)]
        p.send(*(web(c, 1) for c in web_customers))
        p.send(*(web(c, 0) for c in new_customers))
        sent = 2 * len(web_customers) + len(store_customers) + len(new_customers)

        # Processing goes on without Redis: every event is applied and looked up.
        wait_until(lambda: worker.stats()["touchpoints"] >= sent, 60)
        for customer in new_customers:
            assert live_journey(worker, customer) is not None, customer
        # Store journeys close meanwhile (their Redis keys must go once it is back).
        closed = p.read(
            topics.journeys,
            lambda docs: {d["customer_id"] for d in docs} >= set(store_customers),
            timeout=60,
        )
        assert {d["customer_id"] for d in closed} >= set(store_customers)

        # Metrics say Redis is down, the buffer is full but bounded, updates were dropped.
        def outage_reported() -> dict[str, float] | bool:
            m = scrape(worker)
            ok = (
                m.get("touchpoint_redis_up") == 0
                and m.get("touchpoint_redis_errors_total", 0) >= 1
                and m.get("touchpoint_redis_dropped_updates_total", 0) >= 1
                and m.get("touchpoint_redis_pending_journeys", 0) > 0
            )
            return m if ok else False

        during = wait_until(outage_reported, 60)
        assert during["touchpoint_redis_pending_journeys"] <= MAX_PENDING
        # Still processing: the worker is healthy apart from Redis.
        health = worker.health()
        assert health is not None and health["ready"] and health["redis_healthy"] is False

        # Redis answers again: the sink catches up and resyncs what it dropped.
        private_redis.signal(signal.SIGCONT)

        def caught_up() -> dict[str, float] | bool:
            m = scrape(worker)
            return (
                m
                if m.get("touchpoint_redis_up") == 1
                and m.get("touchpoint_redis_pending_journeys") == 0
                else False
            )

        wait_until(caught_up, 90)
        assert_mirror_matches(worker, mirrored, web_customers + new_customers, store_customers)

        log = worker.log_path.read_text(errors="replace")
        assert "Redis unavailable" in log
        assert "Redis buffer full" in log
        assert "Redis is back" in log

        # Redis restarts empty (no persistence): the sink notices the new
        # server and re-sends every live journey, with no new events needed.
        private_redis.stop()
        private_redis.start()
        wait_until(lambda: all(mirrored(c) for c in web_customers + new_customers), 90)
        assert_mirror_matches(worker, mirrored, web_customers + new_customers, store_customers)
        assert "Redis restarted or failed over" in worker.log_path.read_text(errors="replace")
        assert worker.process is not None and worker.process.poll() is None
    finally:
        p.close()
        client.close()


def assert_mirror_matches(
    worker: WorkerProcess, mirrored: Any, live: list[str], closed: list[str]
) -> None:
    """Redis holds each live journey as the worker has it, and nothing for closed ones."""

    def mismatches() -> list[tuple[str, Any, Any]]:
        wrong = []
        for customer in live:
            journey, copy = live_journey(worker, customer), mirrored(customer)
            if (
                journey is None
                or copy is None
                or copy["journey_id"] != journey["journey_id"]
                or copy["touchpoint_count"] != journey["touchpoint_count"]
            ):
                wrong.append((customer, journey and journey["journey_id"], copy))
        for customer in closed:
            if mirrored(customer) is not None:
                wrong.append((customer, None, mirrored(customer)))
        return wrong

    deadline = time.monotonic() + 60
    while (wrong := mismatches()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not wrong, wrong


def test_redis_buffer_policy_without_redis() -> None:
    """The bound and what goes first, on the sink alone (no thread, no Redis)."""
    from sinks.redis_sink import RedisJourneySink

    class NoRedis:
        def register_script(self, _script: str) -> None:
            return None

    sink = RedisJourneySink(RedisSettings(max_pending=4), client=NoRedis())
    sink.submit({"closed-1": None, "live-1": b"1", "live-2": b"2"})
    sink.submit({"live-1": b"1b"})  # newest value wins, no growth
    assert sink._pending == {"closed-1": None, "live-1": b"1b", "live-2": b"2"}
    assert not sink.needs_resync
    sink.submit({"closed-2": None, "live-3": b"3"})
    # Over the bound: the oldest live value goes, the deletes stay; a resync is due.
    assert sink._pending == {"closed-1": None, "live-2": b"2", "closed-2": None, "live-3": b"3"}
    assert sink.needs_resync and sink.dropped == 1
    # A failed write puts its batch back under the same bound.
    batch = sink._take()
    sink.submit({"live-4": b"4", "live-5": b"5"})
    sink._restore(batch)
    assert len(sink._pending) == 4
    assert sink._pending["live-5"] == b"5" and sink._pending["closed-1"] is None
    # A resync that does not fit does not ask for yet another resync.
    sink.needs_resync = False
    sink.submit({f"live-{i}": b"x" for i in range(10, 20)}, resync=True)
    assert len(sink._pending) == 4 and not sink.needs_resync
