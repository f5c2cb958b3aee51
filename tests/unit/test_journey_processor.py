"""The journey stage's shell around the sessionizer, without Kafka: deadlines on stream time.

A partition keeps a heap of per-customer deadlines (journey close, rule
deadlines) and fires them as its stream time passes them, even for customers
that send nothing more. States that only wait for their expiry are not on the
heap: they expire when read and are removed from the store by a paged scan.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from schemas.decoder import EventDecoder
from streams.bundles import Partitioner, encode_bundle
from streams.core.rules import RuleEngine, load_rules
from streams.core.sessionizer import MINUTE, SessionConfig, Sessionizer
from streams.ingest import Ingestor, MemoryMessage
from streams.journeys import DictStore, JourneyProcessor
from tests.events import BASE_MS, event, page_view
from tests.harness import Outputs
from tests.scenarios import scenario_rules
from touchpoint import jsonio
from touchpoint.config import TopicSettings

T = BASE_MS


class Stage:
    """One partition of the journey stage, fed one bundle per call."""

    def __init__(self, tmp_path: Path, expire_ms: int = SessionConfig.expire_ms) -> None:
        rules = load_rules(scenario_rules(tmp_path))  # cart deadline 15 min
        partition_of = Partitioner(1)
        self.out = Outputs(TopicSettings())
        self.store = DictStore(partition_of)
        self.processor = JourneyProcessor(
            Sessionizer(
                SessionConfig(gap_ms=10 * MINUTE, grace_ms=MINUTE, expire_ms=expire_ms),
                RuleEngine(rules),
            ),
            partitions=1,
            store=self.store,
            output=self.out,  # type: ignore[arg-type]
            topics=self.out.topics,
            wall=lambda: 0.0,
            spikes=rules.spikes,
        )
        self.ingestor = Ingestor(EventDecoder(clock=lambda: 4e9), partition_of, {})
        self.offset = 0

    def feed(self, *events: dict[str, Any]) -> None:
        messages = [
            MemoryMessage(jsonio.dumps(e), "touchpoints.web", i) for i, e in enumerate(events)
        ]
        for items in self.ingestor.process(messages, 0).bundles.values():
            self.processor.handle(0, self.offset, encode_bundle(items, 0))
            self.offset += 1

    def journeys(self, customer: str) -> list[dict[str, Any]]:
        return [
            j
            for j in self.out.records.get("touchpoints.journeys", [])
            if j["customer_id"] == customer
        ]

    def signals(self, customer: str) -> list[dict[str, Any]]:
        return [
            s
            for s in self.out.records.get("touchpoints.friction", [])
            if s["customer_id"] == customer
        ]


def cart_add(eid: str, ts: int, customer: str) -> dict[str, Any]:
    return event(
        "cart_add", eid, customer_id=customer, ts=ts, cart_id="cart-1", product_id="p", price=5.0
    )


def test_a_returning_customers_journey_closes_on_stream_time(tmp_path: Path) -> None:
    stage = Stage(tmp_path)
    stage.feed(page_view("a-1", customer_id="alice", ts=T))
    # Someone else moves the partition's stream time past alice's gap + grace.
    stage.feed(page_view("b-1", customer_id="bob", ts=T + 12 * MINUTE))
    assert len(stage.journeys("alice")) == 1  # her state now waits for its 30-day expiry
    # She comes back and leaves a cart; then only bob's events move time on.
    stage.feed(cart_add("a-2", T + 20 * MINUTE, "alice"))
    stage.feed(page_view("b-2", customer_id="bob", ts=T + 30 * MINUTE))
    assert len(stage.journeys("alice")) == 1  # her deadline (T+31 min) has not passed
    assert stage.signals("alice") == []
    stage.feed(page_view("b-3", customer_id="bob", ts=T + 31 * MINUTE + 1))
    second = stage.journeys("alice")[1:]
    assert [j["touchpoint_count"] for j in second] == [1]
    [signal] = stage.signals("alice")
    assert signal["rule"] == "cart_abandonment"


def test_the_deadline_heap_stays_bounded_when_deadlines_move_earlier(tmp_path: Path) -> None:
    stage = Stage(tmp_path)
    customers = [f"c{i}" for i in range(200)]
    for visit in range(6):
        t = T + visit * 15 * MINUTE  # every customer returns after their journey closed
        stage.feed(*(page_view(f"{c}-{visit}", customer_id=c, ts=t) for c in customers))
    part = stage.processor.parts[0]
    assert len(part.scheduled) == len(customers)
    assert len(part.heap) <= 2 * len(part.scheduled) + 1024
    assert len(stage.journeys("c0")) == 5  # the sixth is still open


def test_states_waiting_only_for_expiry_leave_the_heap_and_are_scanned_out_of_the_store(
    tmp_path: Path,
) -> None:
    stage = Stage(tmp_path, expire_ms=60 * MINUTE)
    processor = stage.processor
    customers = [f"c{i}" for i in range(50)]
    stage.feed(*(page_view(f"{c}-1", customer_id=c, ts=T) for c in customers))
    # bob moves stream time on: the journeys close, nothing else is due for them.
    stage.feed(page_view("b-1", customer_id="bob", ts=T + 20 * MINUTE))
    processor.flush()
    part = processor.parts[0]
    assert set(part.scheduled) == {"bob"}
    assert all(k.encode() in stage.store.data for k in customers)  # kept for returning customers
    stage.feed(page_view("b-2", customer_id="bob", ts=T + 50 * MINUTE))
    assert processor.expire_stored(budget=100) == 0  # not yet 60 min after their last event
    assert not part.expiry_scanning  # one short page: the pass ended; the next one waits
    stage.feed(page_view("b-3", customer_id="bob", ts=T + 61 * MINUTE))
    part.expiry_next_pass = 0.0
    removed = sum(processor.expire_stored(budget=7) for _ in range(10))
    assert removed == len(customers)  # in pages of 7, each state once
    processor.flush()
    assert not any(k.encode() in stage.store.data for k in customers)
    assert b"bob" in stage.store.data


def test_a_state_read_after_its_expiry_starts_afresh_before_the_scan_reaches_it(
    tmp_path: Path,
) -> None:
    stage = Stage(tmp_path, expire_ms=60 * MINUTE)
    stage.feed(page_view("a-1", customer_id="alice", ts=T))
    stage.feed(page_view("b-1", customer_id="bob", ts=T + 30 * MINUTE))  # alice's journey closes
    stage.processor.flush()
    assert stage.processor.lookup("alice") is not None
    stage.feed(page_view("b-2", customer_id="bob", ts=T + 90 * MINUTE))
    stage.processor.flush()
    assert b"alice" in stage.store.data  # expired, but the scan has not run
    assert stage.processor.lookup("alice") is None  # ... and reads as gone
    # The same event id again: within the expiry it is a duplicate, after it a new event.
    stage.feed(page_view("a-1", customer_id="alice", ts=T + 91 * MINUTE))
    view = stage.processor.lookup("alice")
    assert view is not None
    assert view["recent"] == []  # the expired history is gone
    assert [j["touchpoint_count"] for j in view["live"]] == [1]


def test_the_expiry_view_reads_the_leading_fields_of_a_stored_state() -> None:
    import msgspec

    from streams.core.journey import CustomerState, encode_state
    from streams.journeys import _NO_JOURNEYS, _NO_RULES, _expiry_view, _ExpiryView

    names = msgspec.structs.fields(_ExpiryView)
    assert [f.name for f in names] == [
        f.name for f in msgspec.structs.fields(CustomerState)[: len(names)]
    ]
    view = _expiry_view.decode(encode_state(CustomerState("c", touched=42, pos=7)))
    assert (view.key, view.touched, view.pos, bytes(view.journeys)) == ("c", 42, 7, _NO_JOURNEYS)
    assert bytes(view.rules) == _NO_RULES
    assert len(names) == len(msgspec.structs.fields(CustomerState))


class _OrderedOutputs(Outputs):
    """Outputs that also note the order of forwarded bundles and changelog records."""

    def __init__(self) -> None:
        super().__init__(TopicSettings())
        self.sent: list[str] = []

    def changelog(self, partition: int, key: bytes, value: bytes | None) -> None:
        self.sent.append("changelog")

    def bundle(self, partition: int, items: list[Any], now_ms: int) -> None:
        super().bundle(partition, items, now_ms)
        self.sent.append(f"bundle:{len(items)}")


def _identify(eid: str, ts: int, anonymous: str) -> dict[str, Any]:
    return event(
        "identify", eid, customer_id="carol", anonymous_id=anonymous, ts=ts, method="login"
    )


def test_forwards_are_gathered_across_bundles_and_sent_with_the_flush_before_the_changelog(
    tmp_path: Path,
) -> None:
    stage = Stage(tmp_path)
    stage.out = stage.processor.output = _OrderedOutputs()  # type: ignore[assignment]
    # Each identify sends a link to its anonymous id's partition (the only one here).
    stage.feed(_identify("i-1", T, "anon-1"))
    stage.feed(_identify("i-2", T + 500, "anon-2"))
    assert stage.out.sent == []  # nothing yet: stream time moved < 2 s (grace / 30)
    stage.processor.flush()
    sent = stage.out.sent
    assert sent[0] == "bundle:2"  # both links in one message, ahead of the states
    assert "changelog" in sent[1:] and "bundle:2" not in sent[1:]
    ((partition, data),) = stage.out.forwarded
    stage.processor.handle(partition, stage.offset, data)  # the links arrive
    assert stage.processor.state("anon-1").alias_of == "carol"
    assert stage.processor.state("anon-2").alias_of == "carol"


def test_forwards_go_out_once_stream_time_is_a_thirtieth_of_the_grace_past_the_first(
    tmp_path: Path,
) -> None:
    stage = Stage(tmp_path)  # grace 1 min: forwards wait at most 2 s of stream time
    stage.out = stage.processor.output = _OrderedOutputs()  # type: ignore[assignment]
    stage.feed(_identify("i-1", T, "anon-1"))
    stage.feed(page_view("b-1", customer_id="bob", ts=T + 1_999))
    assert stage.out.sent == []
    stage.feed(page_view("b-2", customer_id="bob", ts=T + 2_000))
    assert stage.out.sent == ["bundle:1"]  # without waiting for a flush


def test_a_partitions_forwards_go_out_at_once_when_they_fill_a_bundle(tmp_path: Path) -> None:
    stage = Stage(tmp_path)
    stage.out = stage.processor.output = _OrderedOutputs()  # type: ignore[assignment]
    stage.feed(*(_identify(f"i-{n}", T + n, f"anon-{n}") for n in range(501)))
    assert stage.out.sent == ["bundle:500"]  # FORWARD_BUNDLE_MAX; the 501st waits
    stage.processor.flush()
    assert stage.out.sent[:2] == ["bundle:500", "bundle:1"]
