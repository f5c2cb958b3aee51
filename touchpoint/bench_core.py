"""The journey stage's pure core in one process, without Kafka: events/s and a profile.

    python -m touchpoint.bench_core --events 200000 [--profile]

Same data as ``touchpoint bench`` (the simulator, seed 42, 50 events/s of
simulated time). Events are validated and bundled in process (not timed),
then :class:`~streams.journeys.JourneyProcessor` applies the bundles with
the built-in rules and flushes every ``--flush-every`` bundles into a
:class:`~streams.journeys.DictStore` and an output that only keeps the bytes.
Everything the worker does per event except Kafka and Faust is timed: bundle
decode, sessionizer, rules, deadlines, state encoding, Redis values, output
records. It is the ceiling the worker can reach and where its time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from typing import Any

from schemas.decoder import EventDecoder
from streams.bundles import Partitioner, encode_bundle
from streams.core.rules import RuleEngine, load_rules
from streams.core.sessionizer import SessionConfig, Sessionizer
from streams.ingest import Ingestor, MemoryMessage
from streams.journeys import DictStore, JourneyProcessor
from touchpoint import jsonio
from touchpoint.config import TopicSettings
from touchpoint.simulator import Simulator


class _Output:
    """Keeps counts and bytes of what the worker would send."""

    def __init__(self) -> None:
        self.records = 0
        self.bytes = 0
        self.changelog_records = 0
        self.forwarded: list[tuple[int, bytes]] = []

    def record(self, topic: str, key: str, value: bytes) -> None:
        self.records += 1
        self.bytes += len(value)

    def changelog(self, partition: int, key: bytes, value: bytes | None) -> None:
        self.changelog_records += 1

    def bundle(self, partition: int, items: list[Any], now_ms: int) -> None:
        self.forwarded.append((partition, encode_bundle(items, now_ms)))


class _Redis:
    def __init__(self) -> None:
        self.values = 0

    def submit(self, updates: dict[str, bytes | None], resync: bool = False) -> None:
        self.values += len(updates)


def prepare(events: int, partitions: int, bundle: int) -> list[tuple[int, bytes]]:
    """Simulated events, validated and bundled as ingest does: (partition, bundle) in order."""
    start_ms = int(time.time() * 1000) - 24 * 3600 * 1000
    sim = Simulator(seed=42, start_ms=start_ms, rate=50.0, customers=20_000)
    messages = [
        MemoryMessage(jsonio.dumps(e), "touchpoints.web", i)
        for i, (_s, e) in enumerate(sim.take(events))
    ]
    ingestor = Ingestor(EventDecoder(), Partitioner(partitions), {})
    out: list[tuple[int, bytes]] = []
    for start in range(0, len(messages), bundle * partitions):
        result = ingestor.process(messages[start : start + bundle * partitions], 0)
        for partition, items in result.bundles.items():
            out.append((partition, encode_bundle(items, 0)))
    return out


def run(bundles: list[tuple[int, bytes]], partitions: int, flush_every: int) -> dict[str, Any]:
    output = _Output()
    redis = _Redis()
    processor = JourneyProcessor(
        Sessionizer(SessionConfig(), RuleEngine(load_rules(None))),
        partitions=partitions,
        store=DictStore(Partitioner(partitions)),
        output=output,  # type: ignore[arg-type]
        topics=TopicSettings(),
        redis=redis,  # type: ignore[arg-type]
    )
    for p in range(partitions):
        processor.load_partition(p)
    offsets = [0] * partitions
    touchpoints = 0
    handle_s = flush_s = 0.0
    clock = time.perf_counter
    for n, (partition, data) in enumerate(bundles, 1):
        t0 = clock()
        touchpoints += processor.handle(partition, offsets[partition], data)
        offsets[partition] += 1
        while output.forwarded:
            forwarded, output.forwarded = output.forwarded, []
            for target, item in forwarded:
                processor.handle(target, offsets[target], item)
                offsets[target] += 1
        t1 = clock()
        handle_s += t1 - t0
        if n % flush_every == 0 or n == len(bundles):
            processor.flush()
            flush_s += clock() - t1
    return {
        "touchpoints": touchpoints,
        "handle_s": handle_s,
        "flush_s": flush_s,
        "changelog_records": output.changelog_records,
        "records": output.records,
        "redis_values": redis.values,
        "cached_states": len(processor.cache),
        "counts": dict(processor.counts),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m touchpoint.bench_core", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--bundle", type=int, default=500, help="touchpoints per bundle (max)")
    parser.add_argument(
        "--flush-every", type=int, default=40, help="bundles between flushes (~1 s of work)"
    )
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    bundles = prepare(args.events, args.partitions, args.bundle)
    print(f"{args.events:,} events in {len(bundles):,} bundles, {args.partitions} partitions")
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        run(bundles, args.partitions, args.flush_every)
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return 0
    for _ in range(args.repeat):
        r = run(bundles, args.partitions, args.flush_every)
        total = r["handle_s"] + r["flush_s"]
        n = r["touchpoints"]
        print(
            f"core: {n / total:>9,.0f} events/s  ({total / n * 1e6:.1f} us/event: "
            f"handle {r['handle_s'] / n * 1e6:.1f}, flush {r['flush_s'] / n * 1e6:.1f}); "
            f"changelog {r['changelog_records'] / n:.2f}/event, "
            f"outputs {r['records']:,}, redis values {r['redis_values']:,}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
