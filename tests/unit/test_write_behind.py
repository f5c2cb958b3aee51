"""Write-behind of the journey stage: what a flush persists, in which order, and replays.

The worker persists a customer's state together with ``pos``, the offset of
the last bundle applied to it; a restarted worker skips bundles at or below
it. So a state may only reach the changelog once the outputs of the bundles
it claims are delivered, and a replay from an older offset must apply every
bundle exactly once, even when a bundle holds the same customer many times.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from schemas.decoder import EventDecoder
from streams.bundles import Forget, Partitioner, encode_bundle
from streams.core.sessionizer import MINUTE, SessionConfig, Sessionizer
from streams.ingest import Ingestor, MemoryMessage
from streams.journeys import DictStore, JourneyProcessor
from tests.events import BASE_MS, page_view
from touchpoint import jsonio
from touchpoint.config import TopicSettings

T = BASE_MS
TOPICS = TopicSettings()


@dataclass
class Recorder:
    """An OutputProducer stand-in that keeps every call in order."""

    calls: list[tuple[str, Any]] = field(default_factory=list)

    def record(self, topic: str, key: str, value: bytes) -> None:
        if topic != TOPICS.signal_counts:
            self.calls.append(("record", (topic, jsonio.loads(value))))

    def changelog(self, partition: int, key: bytes, value: bytes | None) -> None:
        self.calls.append(("changelog", (partition, key, value)))

    def bundle(self, partition: int, items: list[Any], now_ms: int) -> None:
        self.calls.append(("bundle", (partition, items)))

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.calls]

    def records(self, topic: str) -> list[dict[str, Any]]:
        return [args[1] for kind, args in self.calls if kind == "record" and args[0] == topic]


def processor(out: Recorder, store: DictStore) -> JourneyProcessor:
    return JourneyProcessor(
        Sessionizer(SessionConfig(gap_ms=10 * MINUTE, grace_ms=MINUTE)),
        partitions=1,
        store=store,
        output=out,  # type: ignore[arg-type]
        topics=TOPICS,
        wall=lambda: 0.0,
    )


def bundles(*groups: list[dict[str, Any]]) -> list[bytes]:
    """One bundle per group of events (partition 0)."""
    ingestor = Ingestor(EventDecoder(clock=lambda: 4e9), Partitioner(1), {})
    out = []
    for group in groups:
        messages = [
            MemoryMessage(jsonio.dumps(e), "touchpoints.web", i) for i, e in enumerate(group)
        ]
        (items,) = ingestor.process(messages, 0).bundles.values()
        out.append(encode_bundle(items, 0))
    return out


def test_a_deferred_flush_sends_no_state_until_asked_and_then_the_same_records() -> None:
    store = DictStore(Partitioner(1))
    out = Recorder()
    p = processor(out, store)
    first, second = bundles(
        [page_view("a-1", customer_id="alice", ts=T)],
        [page_view("b-1", customer_id="bob", ts=T + 20 * MINUTE)],  # closes alice's journey
    )
    p.handle(0, 0, first)
    p.handle(0, 1, second)
    deferred: list[tuple[int, bytes, bytes | None]] = []
    p.flush(deferred=deferred)
    assert "changelog" not in out.kinds()
    assert [j["customer_id"] for j in out.records(TOPICS.journeys)] == ["alice"]
    # The store is current at once (lookups and later bundles read it) ...
    assert {b"alice", b"bob"} <= set(store.data)
    # ... and the changelog gets exactly those values, after the outputs.
    p.write_changelog(deferred)
    sent = [args for kind, args in out.calls if kind == "changelog"]
    assert sent == deferred and {k for _p, k, _v in sent} >= {b"alice", b"bob"}
    last = {k: v for _p, k, v in sent}  # what a compacted changelog keeps
    assert all(store.data[k] == v for k, v in last.items())
    assert out.kinds().index("changelog") > out.kinds().index("record")


class MirrorRecorder:
    """A RedisJourneySink stand-in: every submit, in order."""

    def __init__(self) -> None:
        self.submits: list[dict[str, bytes | None]] = []
        self.erased: list[str] = []

    def submit(
        self, updates: dict[str, bytes | None], resync: bool = False, erased: Any = ()
    ) -> None:
        self.submits.append(dict(updates))
        self.erased.extend(erased)


def test_redis_sees_a_deferred_flush_only_once_its_changelog_is_delivered() -> None:
    mirror = MirrorRecorder()
    p = processor(Recorder(), DictStore(Partitioner(1)))
    p.redis = mirror  # type: ignore[assignment]
    (first,) = bundles([page_view("a-1", customer_id="alice", ts=T)])
    p.handle(0, 0, first)
    deferred: list[tuple[int, bytes, bytes | None]] = []
    p.flush(deferred=deferred)
    assert mirror.submits == []  # a crash now rolls alice back: Redis must not show her
    # A second flush before delivery (it cannot happen in the worker: flushes
    # are serialised) would still be held, newest value per key.
    p.write_changelog(deferred)
    p.publish_mirror()
    assert [set(s) for s in mirror.submits] == [{"alice"}]
    assert jsonio.loads(mirror.submits[0]["alice"] or b"")["customer_id"] == "alice"
    p.publish_mirror()  # nothing pending: nothing sent again
    assert len(mirror.submits) == 1
    # Without ``deferred`` (tests, tools) the update goes out at once.
    (second,) = bundles([page_view("b-1", customer_id="bob", ts=T + 1)])
    p.handle(0, 1, second)
    p.flush()
    assert [set(s) for s in mirror.submits] == [{"alice"}, {"bob"}]


def test_a_resync_sends_only_durable_state() -> None:
    # The worker resyncs right after a flush's changelog is delivered; bundles
    # handled while that flush waited on the broker are not durable yet.
    mirror = MirrorRecorder()
    p = processor(Recorder(), DictStore(Partitioner(1)))
    p.redis = mirror  # type: ignore[assignment]
    first, second = bundles(
        [page_view("a-1", customer_id="alice", ts=T), page_view("b-1", customer_id="bob", ts=T)],
        [
            page_view("b-2", customer_id="bob", ts=T + 1),
            page_view("c-1", customer_id="carol", ts=T + 1),
        ],
    )
    p.handle(0, 0, first)
    deferred: list[tuple[int, bytes, bytes | None]] = []
    p.flush(deferred=deferred)
    p.handle(0, 1, second)  # during the flush's await
    p.write_changelog(deferred)
    p.publish_mirror()
    mirror.submits.clear()
    p.resync_redis()
    assert [set(s) for s in mirror.submits] == [{"alice"}]
    # The next flush mirrors bob's and carol's changes once they are durable.
    deferred = []
    p.flush(deferred=deferred)
    p.write_changelog(deferred)
    p.publish_mirror()
    assert [set(s) for s in mirror.submits] == [{"alice"}, {"bob", "carol"}]
    bob = jsonio.loads(mirror.submits[1]["bob"] or b"")
    assert bob["touchpoint_count"] == 2


def test_replay_after_a_crash_applies_each_bundle_once_with_a_customer_many_times_per_bundle() -> (
    None
):
    groups = [
        [
            page_view(f"{c}-{i}-{j}", customer_id=c, ts=T + i * MINUTE + j)
            for c in "xyz"
            for j in range(3)
        ]
        for i in range(8)
    ]
    groups.append([page_view("end", customer_id="w", ts=T + 60 * MINUTE)])  # closes everything
    data = bundles(*groups)

    reference = Recorder()
    p = processor(reference, DictStore(Partitioner(1)))
    for offset, bundle in enumerate(data):
        p.handle(0, offset, bundle)
    p.flush()

    # Crash run: persisted after bundle 4 (acked up to 2 only), crashed after 6.
    out = Recorder()
    store = DictStore(Partitioner(1))
    p = processor(out, store)
    for offset, bundle in enumerate(data[:5]):
        p.handle(0, offset, bundle)
    p.flush()
    for offset, bundle in enumerate(data[5:7], start=5):
        p.handle(0, offset, bundle)
    restarted = processor(out, DictStore(Partitioner(1)))
    restarted.store.data.update(store.data)  # type: ignore[attr-defined]
    for offset, bundle in enumerate(data[3:], start=3):  # from the committed offset
        restarted.handle(0, offset, bundle)
    restarted.flush()

    def by_id(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for r in records:
            assert out.setdefault(r["journey_id"], r) == r  # duplicates are identical
        return out

    expected = by_id(reference.records(TOPICS.journeys))
    assert by_id(out.records(TOPICS.journeys)) == expected
    assert sorted(j["touchpoint_count"] for j in expected.values()) == [24, 24, 24]
    assert all(j["duplicates"] == 0 for j in expected.values())


def test_a_replay_from_before_an_erasure_does_not_bring_the_customer_back() -> None:
    first, second, after = bundles(
        [page_view("a-1", customer_id="alice", ts=T), page_view("b-1", customer_id="bob", ts=T)],
        # Closes alice's first journey (10-min gap): a replay would publish it again.
        [page_view("a-2", customer_id="alice", ts=T + 20 * MINUTE)],
        [page_view("a-3", customer_id="alice", ts=T + 30 * MINUTE)],
    )
    erase = encode_bundle([Forget("alice")], 0)
    store = DictStore(Partitioner(1))
    p = processor(Recorder(), store)
    p.redis = original = MirrorRecorder()  # type: ignore[assignment]
    for offset, bundle in enumerate([first, second, erase]):
        p.handle(0, offset, bundle)
    deferred: list[tuple[int, bytes, bytes | None]] = []
    p.flush(deferred=deferred)
    p.write_changelog(deferred)
    p.publish_mirror()
    assert b"alice" not in store.data and b"bob" in store.data
    # Redis deletes alice as an erasure (a full buffer never drops it).
    assert original.submits[-1]["alice"] is None and original.erased == ["alice"]

    # Crashed before committing: the successor restores the changelog and
    # replays every bundle since the last commit (offset 0 here).
    out, mirror = Recorder(), MirrorRecorder()
    restarted = processor(out, DictStore(Partitioner(1)))
    restarted.store.data.update(store.data)  # type: ignore[attr-defined]
    restarted.redis = mirror  # type: ignore[assignment]
    restarted.handle(0, 0, first)
    assert restarted.lookup("alice") is None
    restarted.handle(0, 1, second)
    assert restarted.lookup("alice") is None
    restarted.handle(0, 2, erase)
    restarted.flush()
    assert restarted.lookup("alice") is None
    assert out.records(TOPICS.journeys) == []  # nothing of alice published again
    assert all(key != b"alice" for kind, (_p, key, *_v) in out.calls if kind == "changelog")
    assert all("alice" not in s for s in mirror.submits)
    # alice in all three bundles (the erasure too), bob once
    assert restarted.counts["skipped_replayed_keys"] == 4
    bob = restarted.lookup("bob")
    assert bob is not None and bob == p.lookup("bob")  # replayed exactly once
    # What alice does after the erasure is new data.
    restarted.handle(0, 3, after)
    assert restarted.lookup("alice")["live"][0]["touchpoint_count"] == 1  # type: ignore[index]


def test_alerting_keeps_the_larger_count_from_a_partition_replaying_behind_its_last_report() -> (
    None
):
    from streams.core.rules import SpikeConfig
    from streams.core.spikes import WindowAggregator
    from tests.unit.test_spikes import partial

    aggregator = WindowAggregator(SpikeConfig(), 2, [("r", "web")], {"r": "low"}, wall=lambda: 0.0)
    w = 0  # window [0, 60 s)
    aggregator.update(partial(0, 90_000, {w: {"r|web": 5}}))
    # Taken over after a crash: the new owner recovered an older state.
    aggregator.update(partial(0, 30_000, {w: {"r|web": 3}}))
    assert aggregator.state.windows["0"]["0"]["r|web"].count == 5  # does not shrink
    assert aggregator.state.stream_times["0"] == 90_000
    # The last reports before the crash were lost; its replay gets further.
    aggregator.update(partial(0, 80_000, {w: {"r|web": 7}}))
    assert aggregator.state.windows["0"]["0"]["r|web"].count == 7
    aggregator.update(partial(0, 200_000, {}))  # caught up, and pruned the window
    aggregator.update(partial(1, 200_000, {w: {"r|web": 1}}))
    window = aggregator.state.windows["0"]
    assert {p: c["r|web"].count for p, c in window.items()} == {"0": 7, "1": 1}


def test_bundles_skipped_after_a_takeover_or_within_one_are_reported_missing() -> None:
    data = bundles(*[[page_view(f"m-{i}", customer_id=f"c{i}", ts=T + i)] for i in range(6)])
    store = DictStore(Partitioner(1))
    p = processor(Recorder(), store)
    assert p.missing(0, 3) == range(0)  # nothing applied yet: wherever the group starts
    p.handle(0, 0, data[0])
    p.handle(0, 1, data[1])
    assert p.missing(0, 2) == range(0)  # the next one
    assert p.missing(0, 1) == range(0)  # a redelivery
    p.handle(0, 2, b"\x00 not a bundle")  # a corrupt bundle is applied too (dead letter)
    assert p.missing(0, 3) == range(0)
    p.flush()

    # The next owner restores the meta record: bundles 3 and 4 were never applied.
    restarted = processor(Recorder(), DictStore(Partitioner(1)))
    restarted.store.data.update(store.data)  # type: ignore[attr-defined]
    assert restarted.missing(0, 3) == range(0)
    assert restarted.missing(0, 5) == range(3, 5)
    for offset in (3, 4, 5):
        restarted.handle(0, offset, data[offset])
    assert restarted.missing(0, 6) == range(0)
    assert restarted.missing(0, 9) == range(6, 9)
    restarted.pass_over(0, range(6, 9))  # read again (or gone by retention): not missing now
    assert restarted.missing(0, 9) == range(0)
    restarted.pass_over(0, range(2, 4))  # never moves back
    assert restarted.missing(0, 9) == range(0)
    assert restarted.missing(0, 11) == range(9, 11)
