"""The whole pipeline in one process, without Kafka: for fast, deterministic scenario tests.

Simulated events -> Ingestor (validation, bundles per partition) -> JourneyProcessor
per partition, in stream order (forwarded items, which the processor sends
with its flush, are delivered after each flush) -> partition reports ->
WindowAggregator -> alerts. Wall time is frozen, so stream time comes from the
events alone.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any

from schemas.decoder import EventDecoder
from streams.bundles import Partitioner, encode_bundle
from streams.core.rules import RuleEngine, RulesConfig
from streams.core.sessionizer import SessionConfig, Sessionizer
from streams.core.spikes import ALL_CHANNELS, WindowAggregator
from streams.ingest import Ingestor, MemoryMessage
from streams.journeys import DictStore, JourneyProcessor
from touchpoint import jsonio
from touchpoint.config import CHANNELS, TopicSettings

PARTITIONS = 4


@dataclass
class Outputs:
    topics: TopicSettings
    records: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    forwarded: list[tuple[int, bytes]] = field(default_factory=list)
    reports: list[bytes] = field(default_factory=list)

    def record(self, topic: str, key: str, value: bytes) -> None:
        if topic == self.topics.signal_counts:
            self.reports.append(value)
        else:
            self.records.setdefault(topic, []).append(jsonio.loads(value))

    def changelog(self, partition: int, key: bytes, value: bytes | None) -> None:
        pass

    def bundle(self, partition: int, items: list[Any], now_ms: int) -> None:
        self.forwarded.append((partition, encode_bundle(items, now_ms)))


def run_pipeline(
    events: list[dict[str, Any]],
    rules: RulesConfig,
    session: SessionConfig,
    *,
    batch: int = 2_000,
) -> tuple[Outputs, list[dict[str, Any]]]:
    """Returns the outputs (journeys, late, friction records) and the alerts, in order."""
    import msgspec

    from streams.core.spikes import Partial

    topics = TopicSettings()
    partition_of = Partitioner(PARTITIONS)
    out = Outputs(topics)
    processor = JourneyProcessor(
        Sessionizer(session, RuleEngine(rules)),
        partitions=PARTITIONS,
        store=DictStore(partition_of),
        output=out,  # type: ignore[arg-type]
        topics=topics,
        wall=lambda: 0.0,
        spikes=rules.spikes,
    )
    aggregator = WindowAggregator(
        rules.spikes,
        PARTITIONS,
        [(r.name, ch) for r in rules.rules for ch in (*CHANNELS, ALL_CHANNELS)],
        {r.name: r.severity for r in rules.rules},
        overrides=rules.spike_overrides,
        wall=lambda: 0.0,
    )
    decode_report = msgspec.json.Decoder(Partial)
    ingestor = Ingestor(EventDecoder(clock=lambda: 4e9), partition_of, {})
    offsets = [0] * PARTITIONS
    alerts: list[dict[str, Any]] = []
    messages = [MemoryMessage(jsonio.dumps(e), "touchpoints.web", i) for i, e in enumerate(events)]

    def deliver() -> None:
        """Hand forwarded bundles (and the ones they forward in turn) to their partitions."""
        while out.forwarded:
            forwarded, out.forwarded = out.forwarded, []
            for target, data in forwarded:
                processor.handle(target, offsets[target], data)
                offsets[target] += 1

    for start in range(0, len(messages), batch):
        result = ingestor.process(messages[start : start + batch], 0)
        queue = deque(result.bundles.items())
        while queue:
            partition, items = queue.popleft()
            processor.handle(partition, offsets[partition], encode_bundle(items, 0))
            offsets[partition] += 1
            deliver()
        processor.sweep()
        processor.flush()
        while out.forwarded:  # forwards are sent with the flush (JourneyProcessor._forward)
            deliver()
            processor.flush()
        for report in out.reports:
            aggregator.update(decode_report.decode(report))
        out.reports.clear()
        alerts += aggregator.close_ready()
    return out, alerts
