"""``touchpoint demo``: the whole pipeline on one machine, with a live terminal view.

Without ``TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS`` it starts the embedded broker
(Tansu, in memory); with it, the same demo runs against that Kafka. Redis is
used when it answers (``TOUCHPOINT_REDIS_URL``), and skipped otherwise.

Runs ingest and the simulator as threads of this process and one worker as a
subprocess (``touchpoint worker``), exactly as deployed. The demo shortens the
journey gap (2 minutes, 20 s grace) so journeys close while you watch;
``TOUCHPOINT_JOURNEY_*`` variables override that.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from typing import Any

import httpx

from streams.ingest import IngestWorker
from touchpoint.broker import EmbeddedBroker, free_port
from touchpoint.config import KafkaSettings, Settings
from touchpoint.live import publish_live
from touchpoint.producer import TouchpointProducer
from touchpoint.simulator import Incident, Simulator
from touchpoint.topics import ensure_topics

DEMO_JOURNEY = {"TOUCHPOINT_JOURNEY_GAP_MINUTES": "2", "TOUCHPOINT_JOURNEY_GRACE_MINUTES": "0.34"}


def _redis_answers(settings: Settings) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(
            settings.redis.url, socket_connect_timeout=1, **settings.redis.client_kwargs()
        )
        return bool(client.ping())
    except redis.RedisError:
        return False


class Demo:
    def __init__(
        self,
        settings: Settings,
        *,
        rate: float,
        incident_at: float | None,
        incident_for: float,
        bad_every: int,
    ) -> None:
        self.settings = settings
        self.rate = rate
        self.incidents = (
            [Incident("payment_outage", incident_at, incident_for)]
            if incident_at is not None
            else []
        )
        self.bad_every = bad_every
        self.stop = threading.Event()
        self.errors: list[str] = []
        self.sim: Simulator | None = None
        self.ingest: IngestWorker | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_url = ""
        self.sent = 0
        self.redis = False

    def _thread(self, name: str, target: Any) -> threading.Thread:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                self.stop.set()

        thread = threading.Thread(target=guarded, name=name, daemon=True)
        thread.start()
        return thread

    def _start_worker(self, kafka: KafkaSettings, embedded: bool, datadir: str) -> None:
        port = free_port()
        self.worker_url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            **{k: v for k, v in DEMO_JOURNEY.items() if k not in os.environ},
            "TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "TOUCHPOINT_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
            "TOUCHPOINT_WORKER_WEB_PORT": str(port),
            "TOUCHPOINT_WORKER_DATA_DIR": datadir,
            "TOUCHPOINT_REDIS_ENABLED": "true" if self.redis else "false",
        }
        if embedded:
            # Tansu: memory only, and one changelog record per batch (see WorkerSettings).
            env.setdefault("TOUCHPOINT_WORKER_STORE", "memory://")
            env["TOUCHPOINT_WORKER_CHANGELOG_SINGLE_RECORD_BATCHES"] = "true"
        self.worker_log = open(os.path.join(datadir, "worker.log"), "ab")  # noqa: SIM115
        self.worker = subprocess.Popen(
            [sys.executable, "-m", "touchpoint", "--log-level", "warning", "worker"],
            env=env,
            stdout=self.worker_log,
            stderr=subprocess.STDOUT,
        )

    def run(self, duration: float | None = None) -> None:
        embedded = None
        if os.environ.get("TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS"):
            kafka = self.settings.kafka
        else:
            embedded = EmbeddedBroker().start()
            # Tansu holds group joins for half the session timeout: keep it short.
            kafka = KafkaSettings(bootstrap_servers=embedded.bootstrap, session_timeout_ms=6_000)
            print(f"started the embedded broker (Tansu, in memory) at {embedded.bootstrap}")
        self.redis = self.settings.redis.enabled and _redis_answers(self.settings)
        topics = self.settings.topics
        datadir = tempfile.mkdtemp(prefix="touchpoint-demo-")
        threads: list[threading.Thread] = []
        try:
            ensure_topics(kafka, topics)
            self._start_worker(kafka, embedded is not None, datadir)
            self.ingest = IngestWorker(kafka, topics, self.settings.ingest, create_topics=False)
            self.sim = Simulator(
                seed=int(time.time()),
                start_ms=int(time.time() * 1000),
                rate=self.rate,
                # Enough customers that each one comes back rarely: journeys close.
                customers=max(10_000, int(self.rate * 1000)),
                incidents=self.incidents,
            )
            producer = TouchpointProducer(kafka, topics)
            threads = [
                self._thread("ingest", lambda: self.ingest.run(self.stop)),  # type: ignore[union-attr]
                self._thread("simulator", lambda: self._simulate(producer)),
            ]
            self._watch(kafka.bootstrap_servers, duration)
        except KeyboardInterrupt:
            pass
        finally:
            self.stop.set()
            for thread in threads:
                thread.join(10)
            if self.worker is not None:
                self.worker.send_signal(signal.SIGTERM)
                try:
                    self.worker.wait(30)
                except subprocess.TimeoutExpired:
                    self.worker.kill()
            if embedded is not None:
                embedded.stop()
            for error in self.errors:
                print(f"error: {error}", file=sys.stderr)
            print(f"demo stopped (worker log: {datadir}/worker.log)")

    def _simulate(self, producer: TouchpointProducer) -> None:
        assert self.sim is not None

        def count(_source: str, _event: dict) -> None:
            self.sent += 1

        try:
            publish_live(
                self.sim, producer, stop=self.stop, bad_every=self.bad_every, on_event=count
            )
        finally:
            producer.close()

    def _worker_stats(self) -> dict[str, Any]:
        try:
            return httpx.get(f"{self.worker_url}/stats", timeout=1).json()
        except (httpx.HTTPError, ValueError):
            return {}

    def _watch(self, bootstrap: str, duration: float | None) -> None:
        started = time.time()
        tty = sys.stdout.isatty()
        last = (started, 0)
        while not self.stop.wait(1.0 if tty else 5.0):
            if self.worker is not None and self.worker.poll() is not None:
                self.errors.append("the worker stopped; see its log")
                break
            now = time.time()
            ingest = self.ingest
            assert ingest is not None
            done = ingest.events_total
            eps = (done - last[1]) / max(now - last[0], 1e-6)
            last = (now, done)
            stats = self._worker_stats()
            self._render(
                bootstrap, now - started, eps, ingest.by_channel, ingest.by_reason, stats, tty
            )
            if duration is not None and now - started >= duration:
                break

    def _render(
        self,
        bootstrap: str,
        elapsed: float,
        eps: float,
        by_channel: Counter[str],
        by_reason: Counter[str],
        stats: dict[str, Any],
        tty: bool,
    ) -> None:
        assert self.ingest is not None
        incident = ""
        for inc in self.incidents:
            if inc.start_s <= elapsed < inc.start_s + inc.duration_s:
                incident = f"  INCIDENT: {inc.kind} (until +{inc.start_s + inc.duration_s:.0f}s)"
            elif elapsed < inc.start_s:
                incident = f"  {inc.kind} starts at +{inc.start_s:.0f}s"
        counts = stats.get("counts", {})
        journeys = (
            f"{stats.get('touchpoints', 0):,} applied, {counts.get('closed', 0):,} closed, "
            f"{counts.get('late', 0):,} late, {stats.get('cached_states', 0):,} customers live"
            if stats
            else "worker starting ..."
        )
        if not tty:
            print(
                f"+{elapsed:5.0f}s sent {self.sent} ingested {self.ingest.events_total} "
                f"({eps:.0f}/s) dead letters {self.ingest.rejected_total} | journeys: {journeys}"
                f"{incident}",
                flush=True,
            )
            return
        channels = "  ".join(f"{ch} {n}" for ch, n in by_channel.most_common())
        reasons = "  ".join(f"{r} {n}" for r, n in by_reason.most_common()) or "-"
        screen = [
            f"Touchpoint demo  +{elapsed:.0f}s   broker {bootstrap}   Ctrl-C stops{incident}",
            "",
            f"simulated and sent   {self.sent:>10,}",
            f"ingested (valid)     {self.ingest.events_total:>10,}   {eps:8.0f} events/s",
            f"dead letters         {self.ingest.rejected_total:>10,}   {reasons}",
            f"by channel           {channels}",
            f"journeys             {journeys}",
            "",
            f"metrics              {self.worker_url}/metrics",
            f"live journey         {self.worker_url}/journeys/<customer>/   "
            f"(Redis mirror: {'on' if self.redis else 'off'})",
        ]
        sys.stdout.write("\033[H\033[J" + "\n".join(screen) + "\n")
        sys.stdout.flush()
