"""``touchpoint demo``: the whole pipeline on one machine, with a live view.

Without ``TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS`` it starts the embedded broker
(Tansu, in memory); with it, the same demo runs against that Kafka and starts
no broker. Redis is used when it answers (``TOUCHPOINT_REDIS_URL``); otherwise
live journeys stay in the worker, which still answers lookups.

Ingest, the simulator and an alerts-topic reader run as threads of this
process; one worker runs as a subprocess (``touchpoint worker``), exactly as
deployed. Demo settings, each overridable by its usual variable:

- journeys close after 2 minutes of inactivity (20 s grace), so you see them close;
- spike detection counts signals in 5-second windows with a 30-second warm-up
  (the built-in rules otherwise: 1-minute windows, 10-minute warm-up), so the
  incident's alerts fire within about 10 s of its start; ``TOUCHPOINT_RULES_FILE``
  replaces the whole rules file, spike settings included;
- the simulated shop has been open for 8 minutes when the demo starts (that
  history is simulated, not sent), so carts and payments are in full swing
  when the payment outage begins.

SIGINT (Ctrl-C) and SIGTERM stop everything in order: simulator, ingest,
worker, then the broker. The exit status is 0 after a clean stop (signal or
``--duration``) and 1 when a part of the pipeline failed.
"""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from streams.core.rules import DEFAULT_RULES_FILE, RulesConfig, load_rules
from streams.ingest import IngestWorker
from touchpoint import jsonio, metrics, shutdown
from touchpoint.broker import EmbeddedBroker, free_port
from touchpoint.config import KafkaSettings, Settings
from touchpoint.demo_view import (
    IncidentView,
    Rates,
    Snapshot,
    by_label,
    parse_metrics,
    render,
    total,
)
from touchpoint.errors import ConfigError
from touchpoint.live import publish_live
from touchpoint.producer import TouchpointProducer
from touchpoint.simulator import Incident, Simulator
from touchpoint.topics import ensure_topics

DEMO_JOURNEY = {"TOUCHPOINT_JOURNEY_GAP_MINUTES": "2", "TOUCHPOINT_JOURNEY_GRACE_MINUTES": "0.34"}
# Spike settings for the demo, over the built-in rules' [spikes] (calibrated
# with tests/unit/test_demo_alerts.py: the outage fires payment_failure within
# 2 windows and it stays firing until the outage ends; quiet traffic fires
# nothing). alpha is per window: 0.02 per 5 s learns about as fast per minute
# as the default 0.1 per 1-minute window, so the outage does not become normal.
DEMO_SPIKES = {
    "window": '"5s"',
    "warmup_windows": "6",
    "lateness": '"2s"',
    "min_count": "5",
    "alpha": "0.02",
}
WARM_UP_S = 480.0
STOP_TIMEOUT_S = 30.0


def with_spike_settings(text: str, settings: dict[str, str]) -> str:
    """The rules file ``text`` with keys of its ``[spikes]`` table set to ``settings``."""
    section = re.search(r"(?ms)^\[spikes\][^\n]*\n(.*?)(?=^\[|\Z)", text)
    if section is None:
        raise ConfigError(str(DEFAULT_RULES_FILE), ["no [spikes] table to adapt for the demo"])
    body = section.group(1)
    for key, value in settings.items():
        body, found = re.subn(rf"(?m)^{key}\s*=[^#\n]*", f"{key} = {value}  ", body, count=1)
        if not found:
            body = f"{key} = {value}\n{body}"
    return text[: section.start(1)] + body + text[section.end(1) :]


def demo_rules_file(directory: Path) -> Path:
    """The built-in rules with the demo's spike settings, written to ``directory``."""
    path = directory / "demo-rules.toml"
    path.write_text(with_spike_settings(DEFAULT_RULES_FILE.read_text(), DEMO_SPIKES))
    load_rules(path)  # fail here, not in the worker, if the rules file changed shape
    return path


def demo_simulator(
    seed: int, rate: float, live_from_ms: int, incidents: list[Incident]
) -> Simulator:
    """The demo's traffic: its first events at ``live_from_ms`` come from a shop open
    for ``WARM_UP_S`` already. Skip ``sim.until(live_from_ms)`` (that history)
    before sending. Incident times count from ``live_from_ms``.
    """
    return Simulator(
        seed=seed,
        start_ms=live_from_ms - int(WARM_UP_S * 1000),
        rate=rate,
        # Enough customers that each one comes back rarely: journeys close.
        customers=max(10_000, int(rate * 1000)),
        incidents=[Incident(i.kind, WARM_UP_S + i.start_s, i.duration_s) for i in incidents],
    )


def describe_spikes(rules: RulesConfig) -> str:
    s = rules.spikes
    return (
        f"(spike detection: {s.window_ms / 1000:g} s windows, warm-up "
        f"{s.warmup_windows * s.window_ms / 1000:g} s, fires after {s.fire_windows} windows "
        f"above mean + {s.threshold_sigma:g} sigma and >= {s.min_count})"
    )


def _redis_answers(settings: Settings) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(
            settings.redis.url, socket_connect_timeout=1, **settings.redis.client_kwargs()
        )
        return bool(client.ping())
    except redis.RedisError:
        return False


def _redis_where(url: str) -> str:
    """The Redis URL without credentials."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}:{parts.port or 6379}{parts.path}"


def _get(url: str, timeout: float = 2.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except (OSError, ValueError):
        return 0, b""


class Demo:
    def __init__(
        self,
        settings: Settings,
        *,
        rate: float,
        incident_at: float | None,
        incident_for: float,
        bad_every: int,
        interval: float,
        seed: int | None = None,
    ) -> None:
        self.settings = settings
        self.rate = rate
        self.incidents = (
            [Incident("payment_outage", incident_at, incident_for)]
            if incident_at is not None
            else []
        )
        self.bad_every = bad_every
        self.interval = interval
        self.seed = int(time.time()) if seed is None else seed
        self.tty = sys.stdout.isatty()
        self.stop = threading.Event()
        self.received: list[int] = []
        self.errors: list[str] = []
        self.threads: list[threading.Thread] = []
        self.embedded: EmbeddedBroker | None = None
        self.ingest: IngestWorker | None = None
        self.worker: subprocess.Popen[bytes] | None = None
        self.worker_url = ""
        self.metrics_url = ""
        self.datadir = Path(tempfile.mkdtemp(prefix="touchpoint-demo-"))
        self.redis = False
        self.broker_text = self.redis_text = self.spikes_text = ""
        self.sent = 0
        self.warming_up = True
        self.started_at = time.time()
        self.recent_customers: deque[tuple[float, str]] = deque(maxlen=200)
        self.example: str | None = None
        self.alerts: dict[str, dict[str, Any]] = {}
        self._alerts_lock = threading.Lock()

    # ---------------------------------------------------------------- lifecycle
    def run(self, duration: float | None = None) -> int:
        """Run until a signal or ``duration`` seconds; returns the exit status."""
        with shutdown.stop_on_signals(self.stop) as self.received:
            try:
                self._start()
                if not self.stop.is_set():
                    self._watch(duration)
            finally:
                self._shutdown()
        return 1 if self.errors else 0

    def _say(self, text: str) -> None:
        print(text, flush=True)

    def _start(self) -> None:
        settings = self.settings
        if os.environ.get("TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS"):
            kafka = settings.kafka
            self.broker_text = f"Kafka at {kafka.bootstrap_servers} (from configuration)"
            self._say(
                f"using Kafka at {kafka.bootstrap_servers}: topics {settings.topics.prefix}.*, "
                f"worker group {settings.worker.app_id} (set TOUCHPOINT_TOPICS_PREFIX and "
                "TOUCHPOINT_WORKER_APP_ID to keep demo traffic apart)"
            )
        else:
            self.embedded = EmbeddedBroker(
                log_path=self.datadir / "tansu.log", die_with_parent=True
            ).start()
            # Tansu holds group joins for half the session timeout: keep it short.
            kafka = KafkaSettings(
                bootstrap_servers=self.embedded.bootstrap, session_timeout_ms=6_000
            )
            self.broker_text = f"embedded Tansu at {self.embedded.bootstrap} (in memory)"
            self._say(
                f"started the embedded broker (Tansu, in memory) at {kafka.bootstrap_servers}"
            )
        redis_where = _redis_where(settings.redis.url)
        if not settings.redis.enabled:
            self.redis_text = "off (TOUCHPOINT_REDIS_ENABLED=false)"
        elif _redis_answers(settings):
            self.redis = True
            self.redis_text = (
                f"{redis_where}, live journeys at {settings.redis.key_prefix}journey:<customer>"
            )
        else:
            self.redis_text = f"off ({redis_where} does not answer); lookups still work"
        rules_file = settings.worker.rules_file or str(demo_rules_file(self.datadir))
        self.spikes_text = describe_spikes(load_rules(rules_file))
        ensure_topics(kafka, settings.topics)
        self._thread("alerts", lambda: self._follow_alerts(kafka))
        self._start_worker(kafka, rules_file)
        ingest_port = free_port()
        metrics.serve(ingest_port, "127.0.0.1")
        self.metrics_url = f"http://127.0.0.1:{ingest_port}/metrics"
        self.ingest = IngestWorker(kafka, settings.topics, settings.ingest, create_topics=False)
        producer = TouchpointProducer(kafka, settings.topics)
        self.started_at = time.time()
        live_from_ms = int(self.started_at * 1000)
        sim = demo_simulator(self.seed, self.rate, live_from_ms, self.incidents)
        ingest = self.ingest
        self._thread("ingest", lambda: ingest.run(self.stop))
        self._thread("simulator", lambda: self._simulate(sim, producer, live_from_ms))
        self._say(f"worker log: {self.datadir / 'worker.log'}")

    def _thread(self, name: str, target: Callable[[], None]) -> None:
        def guarded() -> None:
            try:
                target()
            except Exception as exc:
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                self.stop.set()

        thread = threading.Thread(target=guarded, name=f"demo-{name}", daemon=True)
        thread.start()
        self.threads.append(thread)

    def _start_worker(self, kafka: KafkaSettings, rules_file: str) -> None:
        port = free_port()
        self.worker_url = f"http://127.0.0.1:{port}"
        env = {
            **os.environ,
            **{k: v for k, v in DEMO_JOURNEY.items() if k not in os.environ},
            "TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
            "TOUCHPOINT_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
            "TOUCHPOINT_WORKER_WEB_PORT": str(port),
            "TOUCHPOINT_WORKER_DATA_DIR": str(self.datadir),
            "TOUCHPOINT_REDIS_ENABLED": "true" if self.redis else "false",
            "TOUCHPOINT_RULES_FILE": rules_file,
        }
        if self.embedded is not None:
            # Tansu: memory only, and one changelog record per batch (see WorkerSettings).
            env.setdefault("TOUCHPOINT_WORKER_STORE", "memory://")
            env["TOUCHPOINT_WORKER_CHANGELOG_SINGLE_RECORD_BATCHES"] = "true"
        with open(self.datadir / "worker.log", "ab") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "touchpoint", "--log-level", "warning", "worker"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own session: a Ctrl-C in the terminal reaches only the demo,
                # which stops the worker after ingest, in order.
                start_new_session=True,
                preexec_fn=shutdown.die_with_parent(),
            )

    def _shutdown(self) -> None:
        self.stop.set()
        if self.tty:
            sys.stdout.write("\033[?25h")  # the cursor, hidden while redrawing
        self._say("stopping: simulator, ingest, worker, broker ...")
        for thread in self.threads:
            thread.join(STOP_TIMEOUT_S)
        if self.worker is not None:
            self._stop_worker(self.worker)
        # Release the Kafka clients before their broker goes away (no reconnect noise).
        self.ingest = None
        gc.collect()
        if self.embedded is not None:
            self.embedded.stop()
        for error in self.errors:
            print(f"error: {error}", file=sys.stderr, flush=True)
        how = "on a signal" if self.received else "at the end of --duration"
        if self.errors:
            how = "after an error"
        self._say(
            f"demo stopped {how} after {time.time() - self.started_at:.0f} s: sent {self.sent:,} "
            f"events (files: {self.datadir})"
        )

    def _stop_worker(self, worker: subprocess.Popen[bytes]) -> None:
        if worker.poll() is None:
            worker.terminate()
            signals = len(self.received)
            deadline = time.monotonic() + STOP_TIMEOUT_S
            # A second Ctrl-C while waiting means: don't wait for a clean stop.
            while worker.poll() is None and time.monotonic() < deadline:
                if len(self.received) > max(signals, 1):
                    break
                time.sleep(0.1)
            if worker.poll() is None:
                worker.kill()
                worker.wait(5)

    # ---------------------------------------------------------------- threads
    def _simulate(self, sim: Simulator, producer: TouchpointProducer, live_from_ms: int) -> None:
        try:
            for n, _event in enumerate(sim.until(live_from_ms)):
                if n % 10_000 == 0 and self.stop.is_set():
                    return
            self.warming_up = False

            def sent(_source: str, event: dict[str, Any]) -> None:
                self.sent += 1
                customer = event.get("customer_id")
                now = time.time()
                # A sample (20 a second): the example customer is picked from the last ~10 s.
                recent = self.recent_customers
                if customer is not None and (not recent or now - recent[-1][0] >= 0.05):
                    recent.append((now, customer))

            publish_live(sim, producer, stop=self.stop, bad_every=self.bad_every, on_event=sent)
        finally:
            producer.close()

    def _follow_alerts(self, kafka: KafkaSettings) -> None:
        """Keep the latest record of every alert id from the alerts topic."""
        from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

        topic = self.settings.topics.alerts
        consumer = Consumer(
            {**kafka.librdkafka(), "group.id": "touchpoint-demo", "enable.auto.commit": False}
        )
        try:
            metadata = consumer.list_topics(topic, timeout=10).topics[topic]
            # A fresh embedded broker: read it all. A real one: only this run's alerts.
            start = OFFSET_BEGINNING if self.embedded is not None else OFFSET_END
            consumer.assign([TopicPartition(topic, p, start) for p in metadata.partitions])
            while not self.stop.is_set():
                message = consumer.poll(0.5)
                value = message.value() if message is not None else None
                if message is None or message.error() is not None or value is None:
                    continue
                try:
                    record = jsonio.loads(value)
                    alert_id = record["alert_id"]
                except (ValueError, KeyError, TypeError):
                    continue
                with self._alerts_lock:
                    self.alerts[alert_id] = record
        finally:
            consumer.close()

    # ---------------------------------------------------------------- the view
    def _watch(self, duration: float | None) -> None:
        throughput, signals = Rates(5.0), Rates(30.0)
        last_print = last_example = 0.0
        if self.tty:
            sys.stdout.write("\033[?25l\033[2J")
        while not self.stop.wait(1.0):
            now = time.time()
            if self.worker is not None and self.worker.poll() is not None:
                self.errors.append(
                    f"the worker stopped (exit status {self.worker.returncode}); "
                    f"see {self.datadir / 'worker.log'}"
                )
                return
            if now - last_example >= 5.0:
                last_example = now
                self.example = self._example_customer(now)
            snap = self._snapshot(now, throughput, signals)
            if self.tty:
                self._draw(render(snap))
            elif now - last_print >= self.interval:
                last_print = now
                print(f"---- +{now - self.started_at:.0f} s", *render(snap), sep="\n", flush=True)
            if duration is not None and now - self.started_at >= duration:
                return

    def _draw(self, lines: list[str]) -> None:
        # Lines that wrap or scroll would break the redraw in place: clip to the terminal.
        width, height = shutil.get_terminal_size()
        out = "".join(line[:width] + "\033[K\n" for line in lines[: max(height - 1, 1)])
        sys.stdout.write("\033[H" + out + "\033[J")
        sys.stdout.flush()

    def _snapshot(self, now: float, throughput: Rates, signals: Rates) -> Snapshot:
        ingest = self.ingest
        assert ingest is not None
        status, body = _get(f"{self.worker_url}/metrics")
        samples = parse_metrics(body.decode()) if status == 200 else {}
        applied = total(samples, "touchpoint_events_out_total")
        by_rule = by_label(samples, "touchpoint_friction_signals_total", "rule")
        throughput.add(now, {"sent": self.sent, "in": ingest.events_total, "applied": applied})
        signals.add(now, by_rule)
        with self._alerts_lock:
            alerts = list(self.alerts.values())
        redis_key = (
            f"{self.settings.redis.key_prefix}journey:{self.example}"
            if self.redis and self.example
            else None
        )
        return Snapshot(
            started_at=self.started_at,
            now=now,
            broker=self.broker_text,
            redis=self.redis_text,
            incidents=[
                IncidentView(i.kind, i.start_s, i.start_s + i.duration_s) for i in self.incidents
            ],
            worker_up=status == 200,
            warming_up=self.warming_up,
            sent=self.sent,
            ingested=ingest.events_total,
            applied=int(applied),
            sent_per_s=throughput.rate("sent"),
            ingested_per_s=throughput.rate("in"),
            applied_per_s=throughput.rate("applied"),
            dead_letters=ingest.rejected_total,
            dead_by_reason=dict(ingest.by_reason),
            late=int(total(samples, "touchpoint_events_late_total")),
            active_by_stage=by_label(samples, "touchpoint_journeys_active", "stage"),
            completed_by_outcome=by_label(
                samples, "touchpoint_journeys_completed_total", "outcome"
            ),
            signals_total=by_rule,
            signals_per_min={rule: signals.rate(rule) * 60 for rule in by_rule},
            alerts=alerts,
            spikes=self.spikes_text,
            metrics_urls=[f"{self.worker_url}/metrics (worker)", f"{self.metrics_url} (ingest)"],
            lookup_url=f"{self.worker_url}/journeys/<customer>/",
            example_customer=self.example,
            redis_key=redis_key,
        )

    def _has_live_journey(self, customer: str) -> bool:
        status, body = _get(f"{self.worker_url}/journeys/{urllib.parse.quote(customer)}/")
        if status != 200:
            return False
        try:
            return bool(json.loads(body).get("live"))
        except ValueError:
            return False

    def _example_customer(self, now: float) -> str | None:
        """A customer with a live journey right now (the current one while it lasts)."""
        if self.example is not None and self._has_live_journey(self.example):
            return self.example
        tried = 0
        # Seen a few seconds ago: ingest and the worker have had time to apply it.
        for seen, customer in reversed(list(self.recent_customers)):
            if now - seen < 3.0:
                continue
            if self._has_live_journey(customer):
                return customer
            tried += 1
            if tried >= 3:
                break
        return None
