"""Journeys against the real broker and Redis: lifecycle, stitching, restart, rebalance, erasure."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from streams.bundles import Partitioner
from tests.events import event, page_view
from tests.pipeline import Pipeline, WorkerProcess, wait_until
from tests.reference import assert_valid_record
from touchpoint.config import KafkaSettings, RedisSettings, TopicSettings

SECOND = 1000


def now_ms() -> int:
    return int(time.time() * 1000)


@pytest.fixture
def pipeline(
    kafka: KafkaSettings,
    topics: TopicSettings,
    redis_settings: RedisSettings,
    unique: str,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> Iterator[Pipeline]:
    # Short gaps so journeys close within a test: 6 s of inactivity, 1 s grace.
    journey = getattr(request, "param", {"gap_minutes": "0.1", "grace_minutes": "0.0167"})
    p = Pipeline(kafka, topics, redis_settings, unique, tmp_path, **journey)
    yield p
    p.close()


def redis_client(settings: RedisSettings) -> redis.Redis:
    return redis.Redis.from_url(settings.url)


def summaries_for(p: Pipeline, customer: str, n: int) -> list[dict[str, Any]]:
    def enough(docs: list[dict[str, Any]]) -> bool:
        return sum(d["customer_id"] == customer for d in docs) >= n

    return [d for d in p.read(p.topics.journeys, enough) if d["customer_id"] == customer]


def test_live_journey_lookup_redis_and_close(pipeline: Pipeline) -> None:
    worker = pipeline.worker()
    worker.wait_ready(partitions=pipeline.topics.partitions)
    t = now_ms()
    pipeline.send(
        page_view("j1-1", customer_id="cust-a", ts=t - 3 * SECOND, url="/"),
        event("product_view", "j1-2", customer_id="cust-a", ts=t - 2 * SECOND, product_id="p1"),
        event(
            "cart_add",
            "j1-3",
            customer_id="cust-a",
            ts=t - SECOND,
            cart_id="c",
            product_id="p1",
            price=5.0,
        ),
        page_view("j1-1", customer_id="cust-a", ts=t - 3 * SECOND, url="/"),  # redelivered
    )
    status, body = wait_until(lambda: (r := worker.journey("cust-a"))[1].get("live") and r, 30)
    assert status == 200
    (live,) = body["live"]
    assert [tp["event_id"] for tp in live["touchpoints"]] == ["j1-1", "j1-2", "j1-3"]
    assert live["stage_current"] == "purchase" and live["cart"]["status"] == "open"
    r = redis_client(pipeline.redis)
    key = f"{pipeline.redis.key_prefix}journey:cust-a"
    stored = wait_until(lambda: r.get(key), 10)
    assert b"j1-3" in stored and 0 < r.ttl(key) <= pipeline.redis.journey_ttl_s

    # Silence: the partition's stream time follows the wall clock and the journey closes.
    (summary,) = summaries_for(pipeline, "cust-a", 1)
    assert_valid_record(summary)
    assert summary["outcome"] == "abandoned_cart"
    assert summary["touchpoint_count"] == 3 and summary["duplicates"] == 1
    wait_until(lambda: r.get(key) is None, 10)
    status, body = worker.journey("cust-a")
    assert (
        status == 200
        and body["live"] == []
        and body["recent"][0]["journey_id"] == summary["journey_id"]
    )
    assert worker.journey("nobody")[0] == 404
    # Write-behind pacing times the real Faust event loop (its selector's waits).
    stats = worker.stats()
    assert stats["flush_pacing_measured"] is True and stats["flushes"] > 0, stats


def test_late_events_go_to_the_late_topic(pipeline: Pipeline) -> None:
    worker = pipeline.worker()
    worker.wait_ready(partitions=pipeline.topics.partitions)
    t = now_ms()
    pipeline.send(page_view("late-1", customer_id="cust-l", ts=t))
    wait_until(lambda: worker.journey("cust-l")[0] == 200, 30)
    pipeline.send(page_view("late-2", customer_id="cust-l", ts=t - 120 * SECOND))
    (late,) = pipeline.read(pipeline.topics.late, lambda docs: len(docs) >= 1)
    assert_valid_record(late)
    assert late["event"]["event_id"] == "late-2" and late["key"] == "cust-l"
    assert late["lateness_ms"] > 100 * SECOND


def _ids_on_different_partitions(partitions: int) -> tuple[str, str]:
    part = Partitioner(partitions)
    customer = "cust-stitch"
    anonymous = next(f"anon-{i}" for i in range(100) if part(f"anon-{i}") != part(customer))
    return customer, anonymous


def test_identity_stitching_across_partitions(pipeline: Pipeline) -> None:
    worker = pipeline.worker()
    worker.wait_ready(partitions=pipeline.topics.partitions)
    customer, anonymous = _ids_on_different_partitions(pipeline.topics.partitions)
    t = now_ms()
    pipeline.send(
        page_view("s-1", customer_id=None, anonymous_id=anonymous, ts=t - 4 * SECOND, url="/"),
        event(
            "product_view",
            "s-2",
            customer_id=None,
            anonymous_id=anonymous,
            ts=t - 3 * SECOND,
            product_id="p",
        ),
    )
    wait_until(lambda: worker.journey(anonymous)[1].get("live"), 30)
    pipeline.send(
        event(
            "identify",
            "s-3",
            customer_id=customer,
            anonymous_id=anonymous,
            ts=t - 2 * SECOND,
            method="login",
        )
    )
    wait_until(lambda: worker.journey(anonymous)[1].get("alias_of") == customer, 30)
    pipeline.send(
        page_view("s-4", customer_id=None, anonymous_id=anonymous, ts=t - SECOND, url="/cart")
    )
    (summary,) = summaries_for(pipeline, customer, 1)
    assert_valid_record(summary)
    assert sorted(tp["event_id"] for tp in summary["touchpoints"]) == ["s-1", "s-2", "s-3", "s-4"]
    assert summary["identified"] is True and summary["anonymous_ids"] == [anonymous]
    assert summary["touchpoint_count"] == 4
    # Nothing is published for the anonymous id: its journey was handed over.
    time.sleep(1)
    anonymous_docs = [
        d
        for d in pipeline.read(pipeline.topics.journeys, lambda d: True, timeout=2)
        if d["customer_id"] == anonymous
    ]
    assert anonymous_docs == []


def _counts(worker: Any, customers: list[str]) -> dict[str, int]:
    out = {}
    for customer in customers:
        status, body = worker.journey(customer)
        out[customer] = (
            sum(j["touchpoint_count"] for j in body.get("live", [])) if status == 200 else 0
        )
    return out


LONG = {"gap_minutes": "30", "grace_minutes": "5"}


def _worker_with_one_view_each(
    pipeline: Pipeline, customers: list[str], prefix: str, t: int
) -> WorkerProcess:
    """A ready worker that has applied one page view of each customer."""
    worker = pipeline.worker()
    worker.wait_ready(partitions=pipeline.topics.partitions)
    pipeline.send(*[page_view(f"{prefix}-{c}", customer_id=c, ts=t) for c in customers])
    wait_until(lambda: _counts(worker, customers) == {c: 1 for c in customers}, 30)
    return worker


@pytest.mark.parametrize("pipeline", [LONG], indirect=True)
def test_state_survives_a_crash_exactly(pipeline: Pipeline) -> None:
    """kill -9 right after input arrives: after restart every event counts exactly once."""
    first = pipeline.worker()
    first.wait_ready(partitions=pipeline.topics.partitions)
    customers = [f"cust-crash-{i}" for i in range(12)]
    t = now_ms()
    pipeline.send(
        *[page_view(f"c1-{c}-{i}", customer_id=c, ts=t + i) for c in customers for i in range(3)]
    )
    wait_until(lambda: all(n == 3 for n in _counts(first, customers).values()), 30)
    time.sleep(1)  # flushed and acked
    pipeline.send(
        *[
            page_view(f"c2-{c}-{i}", customer_id=c, ts=t + 10 + i)
            for c in customers
            for i in range(4)
        ]
    )
    wait_until(lambda: first.health()["touchpoints"] >= 12 * 7, 30)
    first.kill()  # the second batch may or may not have been flushed: both must work

    second = pipeline.worker()
    second.wait_ready(partitions=pipeline.topics.partitions)
    wait_until(lambda: _counts(second, customers) == {c: 7 for c in customers}, 60)
    pipeline.send(*[page_view(f"c3-{c}", customer_id=c, ts=t + 20) for c in customers])
    wait_until(lambda: _counts(second, customers) == {c: 8 for c in customers}, 30)
    _status, body = second.journey(customers[0])
    assert body["live"][0]["duplicates"] == 0


@pytest.mark.parametrize("pipeline", [LONG], indirect=True)
def test_rocksdb_state_is_kept_after_a_clean_stop_and_rebuilt_after_a_crash(
    pipeline: Pipeline,
) -> None:
    """The production store: a clean stop keeps local state, kill -9 rebuilds it from changelogs."""
    pipeline.env["TOUCHPOINT_WORKER_STORE"] = "rocksdb://"
    customers = [f"cust-rocks-{i}" for i in range(8)]
    t = now_ms()
    first = _worker_with_one_view_each(pipeline, customers, "k1", t)
    first.stop()
    assert first.process is not None and first.process.returncode == 0, first.log_tail()

    second = pipeline.worker(port=first.port)  # same port: same local state directory
    second.wait_ready(partitions=pipeline.topics.partitions)
    assert "did not stop cleanly" not in second.log_path.read_text()
    wait_until(lambda: _counts(second, customers) == {c: 1 for c in customers}, 60)
    pipeline.send(*[page_view(f"k2-{c}", customer_id=c, ts=t + 1) for c in customers])
    wait_until(lambda: second.health()["touchpoints"] >= len(customers), 30)
    second.kill()

    third = pipeline.worker(port=first.port)
    third.wait_ready(partitions=pipeline.topics.partitions)
    assert "did not stop cleanly" in third.log_path.read_text()
    wait_until(lambda: _counts(third, customers) == {c: 2 for c in customers}, 60)
    _status, body = third.journey(customers[0])
    # A duplicate here is either the worker applying a bundle twice or ingest
    # (at-least-once) sending an event twice: the figures tell which.
    assert body["live"][0]["duplicates"] == 0, (
        f"ingest read {pipeline.ingest.events_total} events for {2 * len(customers)} sent; "
        f"third worker: {third.stats()['counts']}"
    )


@pytest.mark.parametrize("pipeline", [LONG], indirect=True)
def test_rebalance_between_two_workers_keeps_state_and_routes_lookups(pipeline: Pipeline) -> None:
    a = pipeline.worker()
    a.wait_ready(partitions=pipeline.topics.partitions)
    customers = [f"cust-rb-{i}" for i in range(16)]
    t = now_ms()
    pipeline.send(
        *[page_view(f"r1-{c}-{i}", customer_id=c, ts=t + i) for c in customers for i in range(2)]
    )
    wait_until(lambda: all(n == 2 for n in _counts(a, customers).values()), 30)

    b = pipeline.worker()
    wait_until(lambda: (hb := b.health()) and hb["ready"] and len(hb["partitions"]) == 2, 90)
    wait_until(lambda: (ha := a.health()) and len(ha["partitions"]) == 2, 60)
    pipeline.send(*[page_view(f"r2-{c}", customer_id=c, ts=t + 10) for c in customers])
    # Either worker answers for every customer (the request is routed to the owner).
    wait_until(lambda: _counts(b, customers) == {c: 3 for c in customers}, 60)
    assert _counts(a, customers) == {c: 3 for c in customers}

    b.stop()
    try:
        wait_until(lambda: (ha := a.health()) and len(ha["partitions"]) == 4, 90)
    except AssertionError as exc:
        # Failed once (2026-12-05, full suite, not reproduced in 5 runs alone or
        # with its file): say whether the worker was still rebalancing or recovering.
        raise AssertionError(f"{exc}\nworker a: {a.health()}\n{a.log_tail()}") from None
    pipeline.send(*[page_view(f"r3-{c}", customer_id=c, ts=t + 20) for c in customers])
    wait_until(lambda: _counts(a, customers) == {c: 4 for c in customers}, 60)


def _committed_to_end(pipeline: Pipeline) -> bool:
    """True when the worker group's committed offsets reach the validated topic's end."""
    from confluent_kafka import Consumer, TopicPartition

    probe = Consumer(
        {**pipeline.kafka.librdkafka(), "group.id": pipeline.env["TOUCHPOINT_WORKER_APP_ID"]}
    )
    try:
        wanted = [
            TopicPartition(pipeline.topics.validated, p) for p in range(pipeline.topics.partitions)
        ]
        for tp in probe.committed(wanted, timeout=10):
            _low, high = probe.get_watermark_offsets(tp, timeout=10)
            if max(tp.offset, 0) < high:
                return False
        return True
    finally:
        probe.close()


@pytest.mark.parametrize("pipeline", [LONG], indirect=True)
def test_forget_erases_the_customer_everywhere(pipeline: Pipeline) -> None:
    import subprocess
    import sys

    worker = pipeline.worker()
    worker.wait_ready(partitions=pipeline.topics.partitions)
    customer, anonymous = _ids_on_different_partitions(pipeline.topics.partitions)
    t = now_ms()
    pipeline.send(
        page_view("f-1", customer_id=None, anonymous_id=anonymous, ts=t),
        event(
            "identify",
            "f-2",
            customer_id=customer,
            anonymous_id=anonymous,
            ts=t + 1,
            method="signup",
        ),
        page_view("f-3", customer_id=customer, ts=t + 2),
        page_view("keep-1", customer_id="cust-other", ts=t + 3),
    )
    wait_until(lambda: _counts(worker, [customer]) == {customer: 3}, 30)
    r = redis_client(pipeline.redis)
    key = f"{pipeline.redis.key_prefix}journey:{customer}"
    wait_until(lambda: r.get(key), 10)

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "touchpoint",
            "forget",
            customer,
            "--url",
            worker.url,
            "--timeout",
            "60",
        ],
        env=pipeline.env,
        capture_output=True,
        timeout=90,
    )
    assert result.returncode == 0, result.stderr.decode()[-2000:]
    assert worker.journey(customer)[0] == 404
    wait_until(lambda: worker.journey(anonymous)[0] == 404, 30)
    wait_until(lambda: r.get(key) is None, 10)
    assert worker.journey("cust-other")[0] == 200

    # Redis drops the key only after the changelog with the customer's tombstone
    # is delivered; the cascaded erasure of the anonymous id is a later bundle
    # with its own flush. Two flush completions after this point cover both
    # (the first may have begun before).
    def flushed_after(t: float) -> float:
        wait_until(lambda: (worker.stats()["last_flush_at"] or 0) > t, 30)
        return float(worker.stats()["last_flush_at"])

    flushed_after(flushed_after(time.time()))
    # And the worker's group has committed every bundle, the erasures included:
    # this test is about what the changelog restores. A replay from before the
    # erasure (a crash before Faust's next commit, every ~2.8 s) is covered in
    # tests/unit/test_write_behind.py: Tansu will not let a test client rewind
    # the group of a killed Faust member to force one here.
    wait_until(lambda: _committed_to_end(pipeline), 30)
    # The changelog holds tombstones: a fresh worker recovers nothing of the customer.
    worker.kill()
    fresh = pipeline.worker()
    fresh.wait_ready(partitions=pipeline.topics.partitions)
    assert fresh.journey(customer)[0] == 404 and fresh.journey(anonymous)[0] == 404, fresh.stats()
    assert _counts(fresh, ["cust-other"]) == {"cust-other": 1}
    assert r.get(key) is None


def _validated_ends(pipeline: Pipeline) -> list[int]:
    from confluent_kafka import Consumer, TopicPartition

    probe = Consumer({**pipeline.kafka.librdkafka(), "group.id": "probe-ends"})
    try:
        topic = pipeline.topics.validated
        return [
            probe.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
            for p in range(pipeline.topics.partitions)
        ]
    finally:
        probe.close()


async def _commit_as_worker(pipeline: Pipeline, offsets: dict[int, int]) -> None:
    """Commit the worker group's offsets of the validated topic, as a member of it.

    Tansu takes commits from members only, and the group keeps the protocol
    of Faust's assignor ("faust"): a consumer joins the idle group under
    that name (assigning round robin) to commit.
    """
    from aiokafka import AIOKafkaConsumer, TopicPartition
    from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor

    class AsFaust(RoundRobinPartitionAssignor):
        name = "faust"

    topic = pipeline.topics.validated
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=pipeline.kafka.bootstrap_servers,
        group_id=pipeline.env["TOUCHPOINT_WORKER_APP_ID"],
        enable_auto_commit=False,
        partition_assignment_strategy=(AsFaust,),
        session_timeout_ms=pipeline.kafka.session_timeout_ms,
        heartbeat_interval_ms=1_000,
    )
    await consumer.start()
    try:
        deadline = time.monotonic() + 60
        while not consumer.assignment():
            assert time.monotonic() < deadline, "never got an assignment"
            await consumer.getmany(timeout_ms=500)
        await consumer.commit({TopicPartition(topic, p): o for p, o in offsets.items()})
    finally:
        await consumer.stop()


@pytest.mark.parametrize("pipeline", [LONG], indirect=True)
@pytest.mark.parametrize("found_by", ["the next bundle", "the committed offset"])
def test_bundles_the_consumer_skipped_are_read_again(pipeline: Pipeline, found_by: str) -> None:
    """The group's offsets committed past bundles no worker applied: none is lost.

    That is what Faust leaves after its rebalance race (prefetched records
    of the old generation acked as skipped, or counted as a gap; see
    JourneyProcessor.missing). Here it is made by hand: a clean stop, more
    bundles, then the offsets committed at the topic's end. The worker finds
    the skipped bundles when the next bundle arrives, or, with nothing after
    them, by the committed offset (its sweep timer).
    """
    customers = [f"cust-skip-{i}" for i in range(12)]
    t = now_ms()
    first = _worker_with_one_view_each(pipeline, customers, "s1", t)
    first.stop()
    before = _validated_ends(pipeline)

    pipeline.send(*[page_view(f"s2-{c}", customer_id=c, ts=t + 1) for c in customers])
    wait_until(lambda: pipeline.ingest.released_total >= 2 * len(customers), 30)
    wait_until(lambda: _validated_ends(pipeline) != before and not pipeline.ingest._inflight, 30)
    ends = _validated_ends(pipeline)
    skipped = sum(ends) - sum(before)
    assert skipped > 0
    asyncio.run(
        _commit_as_worker(pipeline, {p: end for p, end in enumerate(ends)}),
    )

    if found_by == "the next bundle":
        pipeline.env["TOUCHPOINT_WORKER_SWEEP_INTERVAL_S"] = "3600"  # no sweep in this test
    second = pipeline.worker()
    if found_by == "the next bundle":
        second.wait_ready()  # partitions are loaded by the first bundle (or the sweep)
    else:
        second.wait_ready(partitions=pipeline.topics.partitions)
        wait_until(lambda: _counts(second, customers) == {c: 2 for c in customers}, 60)
    pipeline.send(*[page_view(f"s3-{c}", customer_id=c, ts=t + 2) for c in customers])
    wait_until(lambda: _counts(second, customers) == {c: 3 for c in customers}, 60)
    stats = second.stats()
    assert stats["refetched_bundles"] == skipped, stats
    # A duplicate is the worker applying a bundle twice, unless ingest
    # (at-least-once) read the events more than once: seen twice in ~15 runs,
    # both times with ingest at 48 events read for the 36 sent.
    redelivered = pipeline.ingest.events_total > 3 * len(customers)
    for customer in customers:
        _status, body = second.journey(customer)
        assert redelivered or body["live"][0]["duplicates"] == 0, (
            body,
            stats,
            pipeline.ingest.events_total,
        )


def test_the_bundle_reader_returns_what_the_topic_holds_of_a_range(
    kafka: KafkaSettings, unique: str
) -> None:
    from confluent_kafka import Producer
    from confluent_kafka.admin import AdminClient, NewTopic

    from streams.refetch import BundleReader

    topic = f"t{unique}.refetch"
    admin = AdminClient(kafka.librdkafka())
    for future in admin.create_topics([NewTopic(topic, 2, 1)]).values():
        future.result()
    producer = Producer(kafka.librdkafka())
    for i in range(10):
        producer.produce(topic, f"p1-{i}".encode(), partition=1)
    assert producer.flush(30) == 0

    reader = BundleReader(kafka, topic, timeout_s=3)
    try:
        assert reader.read(1, range(3, 7)) == [(i, f"p1-{i}".encode()) for i in range(3, 7)]
        assert reader.read(1, range(0)) == []
        assert [o for o, _ in reader.read(1, range(0, 10))] == list(range(10))
        assert reader.read(1, range(9, 10)) == [(9, b"p1-9")]
        with pytest.raises(TimeoutError):
            reader.read(0, range(0, 5))  # an empty partition: nothing ends the read
    finally:
        reader.close()
