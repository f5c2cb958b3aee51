"""A real pipeline for integration tests: topics, in-process ingest, worker subprocesses.

Workers run as separate processes (``python -m touchpoint worker``) so tests can
kill -9 them, restart them and run two at once, exactly as in production.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from streams.ingest import IngestWorker
from tests.kafka_helpers import Record, read_topic
from touchpoint import jsonio
from touchpoint.broker import free_port
from touchpoint.config import IngestSettings, KafkaSettings, RedisSettings, TopicSettings
from touchpoint.producer import TouchpointProducer
from touchpoint.topics import ensure_topics


def wait_until(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    """Poll ``check`` until it returns something truthy; fail with the last value."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout} s (last: {last!r})")


class WorkerProcess:
    def __init__(self, env: dict[str, str], log_path: Path, port: int | None = None) -> None:
        # The same port means the same local state directory (a restart in place).
        self.port = port or free_port()
        self.env = {**env, "TOUCHPOINT_WORKER_WEB_PORT": str(self.port)}
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> WorkerProcess:
        log = open(self.log_path, "ab")  # noqa: SIM115 - closed with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "touchpoint", "worker"],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    def health(self) -> dict[str, Any] | None:
        try:
            response = httpx.get(f"{self.url}/health", timeout=2)
            return response.json() if response.status_code == 200 else None
        except httpx.HTTPError:
            return None

    def stats(self) -> dict[str, Any]:
        """The worker's /stats counters (raises if it does not answer)."""
        response = httpx.get(f"{self.url}/stats", timeout=10)
        response.raise_for_status()
        return response.json()  # type: ignore[no-any-return]

    def wait_ready(self, partitions: int | None = None, timeout: float = 90.0) -> None:
        def ready() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log_tail()
            health = self.health()
            if not health or not health["ready"]:
                return False
            return partitions is None or len(health["partitions"]) == partitions

        wait_until(ready, timeout)

    def journey(self, customer: str) -> tuple[int, dict[str, Any]]:
        response = httpx.get(f"{self.url}/journeys/{customer}/", timeout=10)
        return response.status_code, response.json()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)

    def stop(self, timeout: float = 30.0) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        try:
            text = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(line for line in text if not line.startswith("%"))[-6000:]


class Pipeline:
    """Topics, an ingest thread and any number of worker processes for one test."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        redis: RedisSettings,
        unique: str,
        tmp: Path,
        start_ingest: bool = True,
        **journey: str,
    ) -> None:
        self.kafka = kafka
        self.topics = topics
        self.redis = redis
        self.tmp = tmp
        ensure_topics(kafka, topics)
        self.env = {
            **os.environ,
            "TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "TOUCHPOINT_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
            "TOUCHPOINT_TOPICS_PREFIX": topics.prefix,
            "TOUCHPOINT_TOPICS_PARTITIONS": str(topics.partitions),
            "TOUCHPOINT_WORKER_APP_ID": f"t{unique}",
            "TOUCHPOINT_WORKER_STORE": "memory://",
            "TOUCHPOINT_WORKER_DATA_DIR": str(tmp / "worker-data"),
            # Tansu high-watermark quirk: one changelog record per batch (tests only).
            "TOUCHPOINT_WORKER_CHANGELOG_SINGLE_RECORD_BATCHES": "true",
            "TOUCHPOINT_WORKER_FLUSH_INTERVAL_S": "0.3",
            "TOUCHPOINT_WORKER_IDLE_S": "1",
            "TOUCHPOINT_REDIS_KEY_PREFIX": redis.key_prefix,
            **{f"TOUCHPOINT_JOURNEY_{k.upper()}": v for k, v in journey.items()},
        }
        self.workers: list[WorkerProcess] = []
        self._stop = threading.Event()
        self.ingest = IngestWorker(
            kafka,
            topics,
            IngestSettings(group_id=f"t{unique}-ingest", batch_timeout_s=0.1),
            create_topics=False,
        )
        self._thread = threading.Thread(target=self.ingest.run, args=(self._stop,), daemon=True)
        if start_ingest:
            self._thread.start()
        self.producer = TouchpointProducer(kafka, topics)

    def start_ingest(self) -> None:
        """Start ingest late: what was sent before is a recorded backlog, read as a replay."""
        if not self._thread.is_alive():
            self._thread.start()

    def worker(self, port: int | None = None) -> WorkerProcess:
        worker = WorkerProcess(self.env, self.tmp / f"worker-{len(self.workers)}.log", port)
        self.workers.append(worker)
        return worker.start()

    def send(self, *events: dict[str, Any]) -> None:
        for event in events:
            assert self.producer.send(event) is None, event
        assert self.producer.flush() == 0

    def read(
        self, topic: str, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 60
    ) -> list[dict[str, Any]]:
        """Read ``topic`` (JSON records) from the start until ``until(records)`` holds."""

        def decoded(records: list[Record]) -> list[dict[str, Any]]:
            return [jsonio.loads(r.value) for r in records]

        return decoded(
            read_topic(self.kafka, topic, until=lambda rs: until(decoded(rs)), timeout=timeout)
        )

    def close(self) -> None:
        for worker in self.workers:
            worker.kill()
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        self.producer.close()
