"""Every query of the Grafana dashboard returns data from a real Prometheus.

A real Prometheus (the Debian package) scrapes a worker, an ingest process and
the HTTP collector, each a separate process as deployed, while the simulator's
payment-outage scenario goes through them (so friction signals and spike
alerts happen), plus invalid input (dead letters), late events, repeated
support contacts and collector traffic. Then every target of every panel in
docker/grafana/dashboards/touchpoint.json is sent to Prometheus' HTTP API as
Grafana would send it, and must return at least one finite value. A misspelled
metric, label value or job name in a panel fails this test.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.pipeline import Pipeline, wait_until
from tests.scenarios import JOURNEY_ENV, T0, scenario_rules, traffic
from touchpoint import jsonio
from touchpoint.broker import free_port
from touchpoint.config import KafkaSettings, RedisSettings, TopicSettings
from touchpoint.simulator import event_time_ms

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "touchpoint.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
PROMETHEUS = shutil.which("prometheus")
TOKEN = "dashboard-test-token-0123"
MINUTE = 60_000
# What Grafana substitutes. Everything this test sends happens within the last
# few minutes, so these windows cover all of it.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "15s"}

pytestmark = pytest.mark.skipif(
    PROMETHEUS is None,
    reason="prometheus missing: `make test` installs Debian's prometheus package",
)


def dashboard_targets() -> list[tuple[str, str, str]]:
    """(panel title, refId, expr) of every target in the dashboard, rows included."""

    def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for panel in items:
            yield panel
            yield from panels(panel.get("panels", []))

    uid = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]["uid"]
    found = []
    for panel in panels(json.loads(DASHBOARD.read_text())["panels"]):
        if panel["type"] == "row":
            continue
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == uid, (panel["title"], target["datasource"])
            found.append((panel["title"], target["refId"], target["expr"]))
    return found


def as_grafana_sends(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"unknown dashboard variable in {expr!r}"
    return expr


class Prometheus:
    """A Prometheus server on a free port, scraping the given jobs every second."""

    def __init__(self, tmp: Path, jobs: dict[str, str]) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [
                {"job_name": job, "static_configs": [{"targets": [target]}]}
                for job, target in jobs.items()
            ],
        }
        (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.log = tmp / "prometheus.log"
        self.process = subprocess.Popen(
            [
                str(PROMETHEUS),
                f"--config.file={tmp / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "wb"),  # noqa: SIM115 - closed with the process
        )
        self.url = f"http://127.0.0.1:{self.port}"
        wait_until(self._ready, 30)

    def _ready(self) -> bool:
        assert self.process.poll() is None, self.log.read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def query(self, expr: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": expr}, timeout=10)
        body = response.json()
        assert body["status"] == "success", (expr, body)
        data = body["data"]
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return list(data["result"])

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(15)
        except subprocess.TimeoutExpired:
            self.process.kill()


def finite(series: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(s["value"][1])) for s in series)


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "touchpoint", *args],
        env=env,
        stdout=open(log, "wb"),
        stderr=subprocess.STDOUT,
    )


def event(
    event_type: str, channel: str, customer: str, ts: int, n: int, **props: Any
) -> dict[str, Any]:
    return {
        "schema": f"iglu:com.touchpoint/{event_type}/jsonschema/1-0-0",
        "event_id": f"dash-{customer}-{n}",
        "event_type": event_type,
        "channel": channel,
        "occurred_at": ts,
        "customer_id": customer,
        "properties": props,
    }


def repeated_support_contacts() -> list[dict[str, Any]]:
    """Three customers contacting support three times each: the simulated hour has none."""
    return [
        event(
            "support_contact",
            "support",
            f"cust-dash-{c}",
            T0 + (5 + 2 * n) * MINUTE,
            n,
            medium="call",
            topic="delivery",
            contact_id=f"call-dash-{c}-{n}",
        )
        for c in range(3)
        for n in range(3)
    ]


INVALID = [
    b"{not json",
    b"[1, 2]",
    b'{"schema": "iglu:com.touchpoint/page_view/jsonschema/1-0-0"}',
    b'{"schema": "iglu:com.touchpoint/nope/jsonschema/1-0-0", "event_id": "x"}',
    b"",
]


def test_every_dashboard_query_returns_data(
    kafka: KafkaSettings,
    redis_settings: RedisSettings,
    unique: str,
    tmp_path: Path,
) -> None:
    targets = dashboard_targets()
    assert len(targets) >= 20
    topics = TopicSettings(prefix=f"t{unique}.touchpoints", partitions=4)
    journey = {k.removeprefix("TOUCHPOINT_JOURNEY_").lower(): v for k, v in JOURNEY_ENV.items()}
    p = Pipeline(kafka, topics, redis_settings, unique, tmp_path, start_ingest=False, **journey)
    processes: list[subprocess.Popen[bytes]] = []
    prometheus: Prometheus | None = None
    try:
        p.env["TOUCHPOINT_RULES_FILE"] = str(scenario_rules(tmp_path))
        ingest_port, collector_port = free_port(), free_port()
        env = {
            **p.env,
            # Not Pipeline's in-process ingest group: that consumer is subscribed but idle.
            "TOUCHPOINT_INGEST_GROUP_ID": f"t{unique}-ingest-process",
            "TOUCHPOINT_INGEST_BATCH_TIMEOUT_S": "0.1",
            "TOUCHPOINT_METRICS_HOST": "127.0.0.1",
            "TOUCHPOINT_COLLECTOR_TOKENS": TOKEN,
        }
        collector = spawn(
            ["collector", "--host", "127.0.0.1", "--port", str(collector_port)],
            env,
            tmp_path / "collector.log",
        )
        processes.append(collector)
        worker = p.worker()
        prometheus = Prometheus(
            tmp_path,
            {
                "touchpoint-worker": f"127.0.0.1:{worker.port}",
                "touchpoint-ingest": f"127.0.0.1:{ingest_port}",
                "touchpoint-collector": f"127.0.0.1:{collector_port}",
            },
        )
        worker.wait_ready(partitions=topics.partitions)

        # A recorded hour with a payment outage, as a backfill (see test_alerts).
        events = sorted(traffic(4, outage=True) + repeated_support_contacts(), key=event_time_ms)
        p.send(*events)
        for raw in INVALID:
            p.producer.send_raw(topics.raw("web"), raw)
        assert p.producer.flush() == 0
        processes.append(
            spawn(["ingest", "--metrics-port", str(ingest_port)], env, tmp_path / "ingest.log")
        )
        wait_until(lambda: (h := worker.health()) and h["touchpoints"] >= len(events) - 50, 240)
        alerts = p.read(topics.alerts, lambda docs: any(d["state"] == "firing" for d in docs), 120)
        assert any(a["state"] == "firing" for a in alerts), "the outage raised no alert"

        # Through the collector: events far behind stream time (late), one
        # invalid event (dead letter) and a request with a wrong token.
        late = [
            event("page_view", "web", f"cust-late-{n}", T0 + 20 * MINUTE, 0, url="/")
            for n in range(8)
        ]
        base = f"http://127.0.0.1:{collector_port}"
        wait_until(lambda: collector.poll() is None and _up(f"{base}/health"), 60)
        body = jsonio.dumps([*late, {"event_type": "page_view"}])
        headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
        assert (
            httpx.post(f"{base}/v1/events", content=body, headers=headers, timeout=30).status_code
            == 207
        )
        wrong = {**headers, "Authorization": "Bearer not-the-token-at-all"}
        assert (
            httpx.post(f"{base}/v1/events", content=body, headers=wrong, timeout=30).status_code
            == 401
        )

        # More invalid input while ingest runs (what came before may be read
        # before Prometheus' first scrape of ingest).
        for raw in INVALID:
            p.producer.send_raw(topics.raw("app"), raw)
        assert p.producer.flush() == 0

        late_ids = {e["event_id"] for e in late}
        records = p.read(
            topics.late, lambda docs: late_ids <= {d["event"]["event_id"] for d in docs}
        )
        assert late_ids <= {r["event"]["event_id"] for r in records}
        dead = p.read(topics.deadletter, lambda docs: len(docs) >= 2 * len(INVALID) + 1)
        assert len(dead) >= 2 * len(INVALID) + 1

        # Let Prometheus scrape every process a few times after all of that.
        settled = time.time() + 3
        wait_until(
            lambda: (
                finite(q := prometheus.query('min(timestamp(up{job=~"touchpoint-.*"}))'))
                and float(q[0]["value"][1]) > settled
            ),
            60,
        )
        assert len(prometheus.query('up{job=~"touchpoint-.*"} == 1')) == 3

        # The check can fail: a misspelled metric has no data.
        assert not prometheus.query(
            as_grafana_sends(targets[0][2].replace("touchpoint_", "touchpoint_misspelled_"))
        )
        empty, seen = [], []
        for title, ref, expr in targets:
            result = prometheus.query(as_grafana_sends(expr))
            seen.append(f"{title} [{ref}]: {[s['value'][1] for s in result][:6]}")
            if not finite(result):
                empty.append(f"{title} [{ref}]: {expr}")
        assert not empty, (
            "dashboard queries without data:\n" + "\n".join(empty) + "\n\nall:\n" + "\n".join(seen)
        )
    finally:
        if prometheus is not None:
            prometheus.stop()
        for process in processes:
            process.terminate()
        for process in processes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
        p.close()
        p.ingest.close()  # never started (ingest ran as its own process), but connected


def _up(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
