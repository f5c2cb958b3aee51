"""The hot paths in one process, without Kafka: events/s, a profile, or instructions per event.

    python -m touchpoint.bench_core --events 200000 [--profile]
    python -m touchpoint.bench_core --events 50000 --instructions
    python -m touchpoint.bench_core --stage ingest --events 50000 --instructions

Same data as ``touchpoint bench`` (the simulator, seed 42, 50 events/s of
simulated time).

``--stage journeys`` (default): events are validated and bundled in process
(not timed), then :class:`~streams.journeys.JourneyProcessor` applies the
bundles with the built-in rules and flushes every ``--flush-every`` bundles
into a :class:`~streams.journeys.DictStore` and an output that only keeps the
bytes. Everything the worker does per event except Kafka and Faust is timed:
bundle decode, sessionizer, rules, deadlines, state encoding, Redis values,
output records. It is the ceiling the worker can reach and where its time goes.

``--stage ingest``: :class:`~streams.ingest.Ingestor` on batches of raw
messages, then grouping and bundle encoding, as ``IngestWorker`` does minus
Kafka and alignment. ``--stage raw`` is the Python part of the benchmark's
raw ceiling on the same messages (orjson decode and a per-customer count).

``--instructions`` runs the stage under Valgrind's cachegrind (``apt install
valgrind``) and prints CPU instructions per event: the count of a run minus
that of a run that only prepares the data. Unlike events/s on a shared
machine, whose figures drift by 20-30 % within half an hour, the count is
the same from run to run (same data, ``PYTHONHASHSEED=0``), so a change of
1 % shows. It is not time: memory stalls do not count, so confirm a gain in
events/s with interleaved runs. For ingest it also counts ``raw`` and prints
the ratio, the instruction-count counterpart of the benchmark's ingest/raw.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from typing import Any

from schemas.decoder import EventDecoder
from streams.bundles import Partitioner, encode_bundle
from streams.core.rules import RuleEngine, load_rules
from streams.core.sessionizer import SessionConfig, Sessionizer
from streams.ingest import Ingestor, MemoryMessage, encoded_bundles
from streams.journeys import DictStore, JourneyProcessor
from touchpoint import gc_tuning, jsonio
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

    def submit(
        self,
        updates: dict[str, bytes | None],
        *,
        resync: bool = False,
        erased: Iterable[str] = (),
    ) -> None:
        self.values += len(updates)


def _start_ms() -> int:
    """Simulated time starts a day ago, at midnight UTC: the same data all day long."""
    return (int(time.time()) // 86_400 - 1) * 86_400_000


def raw_messages(events: int) -> list[MemoryMessage]:
    """Simulated events as raw messages (JSON, as producers send them)."""
    sim = Simulator(seed=42, start_ms=_start_ms(), rate=50.0, customers=20_000)
    return [
        MemoryMessage(jsonio.dumps(e), f"touchpoints.{source}", i)
        for i, (source, e) in enumerate(sim.take(events))
    ]


def prepare(events: int, partitions: int, bundle: int) -> list[tuple[int, bytes]]:
    """Simulated events, validated and bundled as ingest does: (partition, bundle) in order."""
    messages = raw_messages(events)
    ingestor = Ingestor(EventDecoder(), Partitioner(partitions), {})
    out: list[tuple[int, bytes]] = []
    for start in range(0, len(messages), bundle * partitions):
        result = ingestor.process(messages[start : start + bundle * partitions], 0)
        for partition, items in result.bundles.items():
            out.append((partition, encode_bundle(items, 0)))
    return out


def run_ingest(
    messages: list[MemoryMessage], partitions: int, batch: int = 20_000, bundle: int = 500
) -> dict[str, Any]:
    """Ingest's transform: decode, validate, route, group and encode bundles (no Kafka).

    The same bundling as ``IngestWorker._emit`` (:func:`~streams.ingest.encoded_bundles`).
    """
    ingestor = Ingestor(EventDecoder(), Partitioner(partitions), {})
    started = time.perf_counter()
    accepted = encoded = 0
    for start in range(0, len(messages), batch):
        result = ingestor.process(messages[start : start + batch], 0)
        accepted += result.events
        held = [entry for entries in result.entries.values() for entry in entries]
        for _partition, value in encoded_bundles(held, bundle, 0):
            encoded += len(value)
    return {"touchpoints": accepted, "seconds": time.perf_counter() - started, "bytes": encoded}


def run_raw(messages: list[MemoryMessage]) -> dict[str, Any]:
    """The Python part of the benchmark's raw ceiling: orjson decode, count per customer."""
    per_customer: Counter[str | None] = Counter()
    loads = jsonio.loads
    started = time.perf_counter()
    for message in messages:
        per_customer[loads(message.value()).get("customer_id")] += 1
    return {"touchpoints": len(messages), "seconds": time.perf_counter() - started}


def run(bundles: list[tuple[int, bytes]], partitions: int, flush_every: int) -> dict[str, Any]:
    output = _Output()
    redis = _Redis()
    processor = JourneyProcessor(
        Sessionizer(SessionConfig(), RuleEngine(load_rules(None))),
        partitions=partitions,
        store=DictStore(Partitioner(partitions)),
        output=output,  # type: ignore[arg-type]
        topics=TopicSettings(),
        redis=redis,
    )
    for p in range(partitions):
        processor.load_partition(p)
    offsets = [0] * partitions
    touchpoints = 0
    handle_s = flush_s = 0.0
    clock = time.perf_counter

    def deliver() -> None:
        # Forwarded items (identity stitching) come back as bundles, as from Kafka.
        while output.forwarded:
            forwarded, output.forwarded = output.forwarded, []
            for target, item in forwarded:
                processor.handle(target, offsets[target], item)
                offsets[target] += 1

    for n, (partition, data) in enumerate(bundles, 1):
        t0 = clock()
        touchpoints += processor.handle(partition, offsets[partition], data)
        offsets[partition] += 1
        deliver()
        t1 = clock()
        handle_s += t1 - t0
        if n % flush_every == 0 or n == len(bundles):
            processor.flush()  # sends the forwards gathered since the last one
            t2 = clock()
            flush_s += t2 - t1
            deliver()
            handle_s += clock() - t2
    while output.forwarded:  # the last flush's forwards, and theirs
        t1 = clock()
        deliver()
        t2 = clock()
        processor.flush()
        handle_s += t2 - t1
        flush_s += clock() - t2
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


def _instructions(stage: str, events: int, extra: list[str]) -> int:
    """Instructions executed by one run of ``stage`` minus those of preparing its data."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--instructions needs valgrind (apt install valgrind)")
    counts = []
    for prepare_only in (True, False):
        command = [
            valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null",
            sys.executable, "-m", "touchpoint.bench_core", "--stage", stage,
            "--events", str(events), "--repeat", "1", *extra,
            *(["--prepare-only"] if prepare_only else []),
        ]  # fmt: skip
        done = subprocess.run(
            command,
            env={**os.environ, "PYTHONHASHSEED": "0"},
            capture_output=True,
            text=True,
            check=False,
        )
        found = re.search(r"I\s+refs:\s+([\d,]+)", done.stderr)
        if done.returncode != 0 or found is None:
            raise SystemExit(f"valgrind run failed:\n{done.stdout}\n{done.stderr[-2000:]}")
        counts.append(int(found.group(1).replace(",", "")))
    return counts[1] - counts[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m touchpoint.bench_core", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--stage", choices=("journeys", "ingest", "raw"), default="journeys")
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--bundle", type=int, default=500, help="touchpoints per bundle (max)")
    parser.add_argument(
        "--flush-every", type=int, default=40, help="bundles between flushes (~1 s of work)"
    )
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions per event (valgrind)"
    )
    parser.add_argument("--prepare-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args(argv)
    if args.instructions:
        extra = ["--partitions", str(args.partitions), "--bundle", str(args.bundle)]
        extra += ["--flush-every", str(args.flush_every)]
        per_event = _instructions(args.stage, args.events, extra) / args.events
        print(f"{args.stage}: {per_event:,.0f} instructions per event ({args.events:,} events)")
        if args.stage == "ingest":
            raw = _instructions("raw", args.events, extra) / args.events
            print(f"raw: {raw:,.0f} instructions per event; raw / ingest {raw / per_event:.2f}")
        return 0
    data: Any
    work: Callable[[], dict[str, Any]]
    if args.stage == "journeys":
        data = prepare(args.events, args.partitions, args.bundle)
        print(f"{args.events:,} events in {len(data):,} bundles, {args.partitions} partitions")
        work = lambda: run(data, args.partitions, args.flush_every)  # noqa: E731
    else:
        data = raw_messages(args.events)
        print(f"{args.events:,} raw messages")
        work = (
            (lambda: run_ingest(data, args.partitions, bundle=args.bundle))
            if args.stage == "ingest"
            else (lambda: run_raw(data))
        )
    gc_tuning.tune()  # as in the worker and ingest processes
    if args.prepare_only:
        return 0
    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        work()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(30)
        return 0
    for _ in range(args.repeat):
        r = work()
        n = r["touchpoints"]
        if args.stage != "journeys":
            print(f"{args.stage}: {n / r['seconds']:>9,.0f} events/s")
            continue
        total = r["handle_s"] + r["flush_s"]
        print(
            f"core: {n / total:>9,.0f} events/s  ({total / n * 1e6:.1f} us/event: "
            f"handle {r['handle_s'] / n * 1e6:.1f}, flush {r['flush_s'] / n * 1e6:.1f}); "
            f"changelog {r['changelog_records'] / n:.2f}/event, "
            f"outputs {r['records']:,}, redis values {r['redis_values']:,}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
