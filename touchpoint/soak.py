"""Soak run: the whole pipeline at a steady rate for minutes, watched for leaks.

    python -m touchpoint.soak --minutes 10 --rate 5000

Starts an embedded broker (or uses ``TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS``),
fresh topics, an ingest process, a worker process and the simulator at a
steady rate (``touchpoint simulate``), then samples every ``--interval``
seconds: the worker's RSS, open journeys, asyncio tasks, threads and open file
descriptors, ingest's RSS and descriptors, the broker's RSS, and the consumer
lag of ingest (raw topics) and of the worker (validated topic).

It prints the curve and the start/end/max of each series and exits non-zero
if a process died or a series grows without bound. The criterion: the mean
of the last third of the samples may exceed the mean of the middle third by
at most a relative tolerance plus a small absolute slack (the first third is
warm-up: journeys open until the first ones close). A leak grows steadily and
fails it; a plateau passes. Lag is reported and flagged when it keeps
growing (the pipeline cannot keep up with the rate), which is a capacity
finding rather than a leak.

The embedded broker keeps everything in memory, so its own RSS grows with
the data (no retention in Tansu); it is reported, not judged.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from confluent_kafka import Consumer, KafkaException, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from touchpoint.broker import EmbeddedBroker, free_port
from touchpoint.config import KafkaSettings, TopicSettings
from touchpoint.topics import ensure_topics

# series -> (relative tolerance, absolute slack): last-third mean may exceed
# middle-third mean by at most middle * tolerance + slack.
CRITERIA: dict[str, tuple[float, float]] = {
    "worker_rss_mb": (0.10, 25.0),
    "journeys": (0.15, 200.0),
    "tasks": (0.10, 5.0),
    "worker_fds": (0.10, 5.0),
    "ingest_rss_mb": (0.10, 25.0),
    "ingest_fds": (0.10, 5.0),
}
LAG_SERIES = ("ingest_lag", "worker_lag")


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


@dataclass
class Soak:
    kafka: KafkaSettings
    topics: TopicSettings
    workdir: Path
    rate: float
    customers: int
    producers: int = 2
    app_id: str = field(default_factory=lambda: f"soak-{uuid.uuid4().hex[:6]}")
    web_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS": self.kafka.bootstrap_servers,
            "TOUCHPOINT_KAFKA_SESSION_TIMEOUT_MS": str(self.kafka.session_timeout_ms),
            "TOUCHPOINT_TOPICS_PREFIX": self.topics.prefix,
            "TOUCHPOINT_TOPICS_PARTITIONS": str(self.topics.partitions),
            "TOUCHPOINT_INGEST_GROUP_ID": f"{self.app_id}-ingest",
            "TOUCHPOINT_WORKER_APP_ID": self.app_id,
            "TOUCHPOINT_WORKER_WEB_PORT": str(self.web_port),
            "TOUCHPOINT_WORKER_DATA_DIR": str(self.workdir / "worker-data"),
            "TOUCHPOINT_REDIS_KEY_PREFIX": f"soak:{self.app_id}:",
            # Journeys close 1 min (+15 s grace) after their last touchpoint, so
            # the number of open journeys levels off within the warm-up third.
            "TOUCHPOINT_JOURNEY_GAP_MINUTES": "1",
            "TOUCHPOINT_JOURNEY_GRACE_MINUTES": "0.25",
        }

    def spawn(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - handed to the child
        process = subprocess.Popen(
            [sys.executable, "-m", "touchpoint", "--log-level", "info", *args],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        self.processes[name] = process
        return process

    def get(self, path: str) -> Any:
        try:
            response = httpx.get(f"http://127.0.0.1:{self.web_port}{path}", timeout=20)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        return response.json() if path != "/metrics" else response.text

    def start(self) -> None:
        ensure_topics(self.kafka, self.topics)
        self.spawn("worker", "worker")
        deadline = time.monotonic() + 180
        while True:
            health = self.get("/health")
            if health and health["ready"] and len(health["partitions"]) == self.topics.partitions:
                break
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready; see {self.workdir / 'worker.log'}")
            time.sleep(0.5)
        self.spawn("ingest", "ingest")
        # Several simulator processes share the rate: one Python process
        # generates, validates and sends only a few thousand events a second.
        for n in range(self.producers):
            self.spawn(
                f"simulate-{n}",
                "simulate",
                "--rate",
                str(self.rate / self.producers),
                "--customers",
                str(self.customers),
                "--seed",
                str(7 + n),
            )

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with status {process.returncode}; "
                    f"see {self.workdir / (name + '.log')}"
                )

    def stop(self) -> None:
        names = [n for n in self.processes if n.startswith("simulate")] + ["ingest", "worker"]
        for name in names:
            process = self.processes.get(name)
            if process is not None and process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)

    # ------------------------------------------------------------ sampling
    def lag(self, consumer: Consumer, group: str, topics: list[str]) -> int | None:
        """Messages not yet committed by ``group`` on ``topics`` (None: not known yet)."""
        partitions = [
            TopicPartition(topic, p) for topic in topics for p in range(self.topics.partitions)
        ]
        probe = Consumer({**self.kafka.librdkafka(), "group.id": group})
        try:
            committed = probe.committed(partitions, timeout=10)
        except KafkaException:
            return None
        finally:
            probe.close()
        total = 0
        for tp in committed:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(tp.topic, tp.partition), timeout=10
            )
            # Tansu reports the high watermark of a partition as the start of its
            # last batch + 1, so a fully consumed partition can look "ahead".
            total += max(0, high - max(tp.offset, 0))
        return total

    def sample(self, consumer: Consumer) -> dict[str, float | None]:
        """One sample; None where the worker did not answer (it is then left out)."""
        worker, ingest = self.processes["worker"].pid, self.processes["ingest"].pid
        stats = self.get("/stats") or {}
        journeys = None
        text = self.get("/metrics")
        for family in text_string_to_metric_families(text or ""):
            if family.name == "touchpoint_journeys_active":
                journeys = sum(s.value for s in family.samples)
        return {
            "worker_rss_mb": rss_mb(worker),
            "journeys": journeys,
            "scheduled": stats.get("scheduled_states"),
            "cached": stats.get("cached_states"),
            "heap": stats.get("heap_entries"),
            "rocks_mb": (
                (sum(v for k, v in stats["rocksdb"].items() if k != "keys") / 2**20)
                if stats.get("rocksdb")
                else None
            ),
            "malloc_used": (stats.get("malloc") or {}).get("in_use_mb"),
            "malloc_free": (stats.get("malloc") or {}).get("free_mb"),
            "py_kblocks": (stats["allocated_blocks"] / 1000)
            if "allocated_blocks" in stats
            else None,
            "tasks": stats.get("asyncio_tasks"),
            "threads": stats.get("threads"),
            "worker_fds": open_fds(worker),
            "ingest_rss_mb": rss_mb(ingest),
            "ingest_fds": open_fds(ingest),
            "touchpoints": stats.get("touchpoints"),
            "ingest_lag": self.lag(consumer, f"{self.app_id}-ingest", list(self.topics.raw_topics)),
            "worker_lag": self.lag(consumer, self.app_id, [self.topics.validated]),
        }


COLUMNS = (
    "worker_rss_mb",
    "journeys",
    "scheduled",
    "cached",
    "heap",
    "py_kblocks",
    "rocks_mb",
    "malloc_used",
    "malloc_free",
    "tasks",
    "threads",
    "worker_fds",
    "ingest_rss_mb",
    "ingest_fds",
    "broker_rss_mb",
    "ingest_lag",
    "worker_lag",
    "touchpoints",
)


Sample = dict[str, float | None]


def print_row(elapsed: float, row: Sample) -> None:
    cells = " ".join(f"{'-':>13}" if row.get(c) is None else f"{row[c]:>13,.0f}" for c in COLUMNS)
    print(f"{elapsed:>7.0f} {cells}", flush=True)


def values(samples: list[Sample], name: str) -> list[float]:
    return [v for s in samples if (v := s.get(name)) is not None]


def mean(samples: list[Sample], name: str) -> float | None:
    known = values(samples, name)
    return sum(known) / len(known) if known else None


def judge(samples: list[Sample]) -> list[str]:
    """Series that grow without bound (last third vs middle third), as messages."""
    third = len(samples) // 3
    if third < 2:
        return ["too few samples to judge (run longer or sample more often)"]
    middle, last = samples[third : 2 * third], samples[2 * third :]
    failures = []
    for name, (tolerance, slack) in CRITERIA.items():
        mid, end = mean(middle, name), mean(last, name)
        if mid is None or end is None:
            failures.append(f"{name}: no samples in the middle or last third")
            continue
        limit = mid * (1 + tolerance) + slack
        verdict = "ok" if end <= limit else "GROWS"
        print(
            f"  {name:<14} middle-third mean {mid:>12,.1f}  last-third mean {end:>12,.1f}  "
            f"limit {limit:>12,.1f}  {verdict}"
        )
        if end > limit:
            failures.append(f"{name} grows: last third {end:,.1f} > {limit:,.1f}")
    return failures


def summarize(samples: list[Sample]) -> None:
    print(f"\n{'series':<14} {'start':>12} {'end':>12} {'max':>12}   (missing samples)")
    for name in COLUMNS:
        known = values(samples, name)
        if known:
            missing = len(samples) - len(known)
            print(
                f"{name:<14} {known[0]:>12,.1f} {known[-1]:>12,.1f} {max(known):>12,.1f}"
                f"   ({missing})"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m touchpoint.soak", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=5000.0, help="simulated events per second")
    parser.add_argument("--interval", type=float, default=10.0, help="seconds between samples")
    parser.add_argument("--customers", type=int, default=1_000_000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--producers", type=int, default=2, help="simulator processes")
    args = parser.parse_args(argv)

    embedded = None
    workdir = Path(tempfile.mkdtemp(prefix="touchpoint-soak-"))
    if os.environ.get("TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS"):
        kafka = KafkaSettings()
    else:
        embedded = EmbeddedBroker(log_path=workdir / "tansu.log").start()
        kafka = KafkaSettings(bootstrap_servers=embedded.bootstrap, session_timeout_ms=6_000)
    topics = TopicSettings(
        prefix=f"soak{uuid.uuid4().hex[:6]}.touchpoints", partitions=args.partitions
    )
    soak = Soak(kafka, topics, workdir, args.rate, args.customers, args.producers)
    print(
        f"soak: {args.minutes} min at {args.rate:,.0f} events/s, {args.partitions} partitions, "
        f"broker {kafka.bootstrap_servers}; logs in {workdir}"
    )
    samples: list[Sample] = []
    failures: list[str] = []
    consumer = Consumer({**kafka.librdkafka(), "group.id": f"{soak.app_id}-lag-probe"})
    try:
        soak.start()
        print(f"{'elapsed':>7} " + " ".join(f"{c:>13}" for c in COLUMNS))
        started = time.monotonic()
        end = started + args.minutes * 60
        next_at = started
        while True:
            soak.check_alive()
            row = soak.sample(consumer)
            if embedded is not None and embedded._process is not None:
                row["broker_rss_mb"] = rss_mb(embedded._process.pid)
            elapsed = row["elapsed"] = time.monotonic() - started
            samples.append(row)
            print_row(elapsed, row)
            next_at += args.interval
            if time.monotonic() >= end:
                break
            time.sleep(max(0.0, min(next_at, end) - time.monotonic()))
    except RuntimeError as exc:
        failures.append(str(exc))
    finally:
        consumer.close()
        soak.stop()
        if embedded is not None:
            embedded.stop()
    if samples:
        summarize(samples)
        print("\ngrowth (last third vs middle third of the run):")
        failures += judge(samples)
        third = len(samples) // 3
        for name in LAG_SERIES:
            mid = mean(samples[third : 2 * third], name)
            end_mean = mean(samples[2 * third :], name)
            if (
                third >= 2
                and mid is not None
                and end_mean is not None
                and end_mean > 2 * mid + args.rate * args.interval / 100
            ):
                print(
                    f"  WARNING: {name} keeps growing ({mid:,.0f} -> {end_mean:,.0f}): "
                    "the pipeline does not keep up with this rate here"
                )
        known = [s for s in samples if s.get("touchpoints") is not None]
        if known:
            print(f"\nworker applied {known[-1]['touchpoints']:,.0f} touchpoints")
        steady = [s for s in known if s in samples[third:]]
        if len(steady) >= 2:
            first, last_ = steady[0], steady[-1]
            span = (last_["elapsed"] or 0) - (first["elapsed"] or 0)
            done = (last_["touchpoints"] or 0) - (first["touchpoints"] or 0)
            print(
                f"worker rate after warm-up: {done / max(span, 1e-9):,.0f} events/s "
                f"(asked {args.rate:,.0f})"
            )
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures))
        return 1
    print("\nno unbounded growth")
    return 0


if __name__ == "__main__":
    sys.exit(main())
