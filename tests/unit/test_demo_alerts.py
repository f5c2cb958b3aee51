"""The demo's spike settings against the demo's traffic, in process (no broker).

``touchpoint demo`` promises that the payment outage's alerts show within
seconds of its start and that normal traffic raises none. This runs the demo's
simulator (warm start included) through the whole pipeline with the demo's
rules file and journey settings and checks both.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from streams.core.rules import load_rules
from streams.core.sessionizer import MINUTE, SessionConfig
from tests.harness import run_pipeline
from touchpoint.demo import DEMO_JOURNEY, demo_rules_file, demo_simulator
from touchpoint.simulator import Incident

LIVE_FROM = 1_790_000_000_000
RATE = 300.0
SESSION = SessionConfig(
    gap_ms=int(float(DEMO_JOURNEY["TOUCHPOINT_JOURNEY_GAP_MINUTES"]) * MINUTE),
    grace_ms=int(float(DEMO_JOURNEY["TOUCHPOINT_JOURNEY_GRACE_MINUTES"]) * MINUTE),
)


def demo_alerts(tmp_path: Path, seed: int, seconds: float, incidents: list[Incident]) -> list:
    sim = demo_simulator(seed, RATE, LIVE_FROM, incidents)
    for _ in sim.until(LIVE_FROM):  # the history the demo does not send
        pass
    events = [event for _source, event in sim.until(LIVE_FROM + int(seconds * 1000))]
    _out, alerts = run_pipeline(events, load_rules(demo_rules_file(tmp_path)), SESSION)
    return alerts


def offset_s(iso: str) -> float:
    return (datetime.fromisoformat(iso).timestamp() * 1000 - LIVE_FROM) / 1000


def test_the_demo_outage_fires_a_payment_failure_alert_within_seconds(tmp_path: Path) -> None:
    rules = load_rules(demo_rules_file(tmp_path))
    window_s = rules.spikes.window_ms / 1000
    alerts = demo_alerts(tmp_path, 7, 200.0, [Incident("payment_outage", 60.0, 120.0)])
    payment: list[dict[str, Any]] = [
        a for a in alerts if a["rule"] == "payment_failure" and a["channel"] == "all"
    ]
    assert [a["state"] for a in payment] == ["firing", "resolved"]
    fired, resolved = payment
    # fire_windows windows above the threshold, the first one may straddle the start.
    fired_window = offset_s(fired["window"]["start"])
    assert 60.0 - window_s <= fired_window <= 60.0 + (rules.spikes.fire_windows + 1) * window_s
    assert fired["value"] > fired["threshold"]
    # The outage does not become the new normal while it lasts.
    assert offset_s(resolved["resolved_at"]) >= 180.0
    # Nothing fired before the outage.
    assert all(offset_s(a["window"]["start"]) >= 60.0 - window_s for a in alerts)


def test_the_demo_traffic_without_an_incident_raises_no_alert(tmp_path: Path) -> None:
    assert demo_alerts(tmp_path, 7, 150.0, []) == []
