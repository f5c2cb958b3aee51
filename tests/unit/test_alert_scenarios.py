"""The payment-outage scenario through the whole pipeline, in process (no broker).

The same traffic goes through the real broker in tests/integration/test_alerts.py.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from streams.core.rules import load_rules
from streams.core.sessionizer import MINUTE, SessionConfig
from tests.harness import run_pipeline
from tests.reference import assert_valid_record
from tests.scenarios import (
    GAP_MS,
    GRACE_MS,
    OUTAGE_LENGTH,
    OUTAGE_START,
    T0,
    scenario_rules,
    traffic,
)


def run(tmp_path: Path, seed: int, outage: bool) -> tuple[Any, list[dict[str, Any]]]:
    rules = load_rules(scenario_rules(tmp_path))
    return run_pipeline(
        traffic(seed, outage), rules, SessionConfig(gap_ms=GAP_MS, grace_ms=GRACE_MS)
    )


def minute(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


def firing(alerts: list[dict[str, Any]], rule: str) -> list[dict[str, Any]]:
    return [
        a for a in alerts if a["rule"] == rule and a["channel"] == "all" and a["state"] == "firing"
    ]


@pytest.mark.parametrize("seed", [1, 4])
def test_a_payment_outage_fires_and_resolves_the_right_alerts(tmp_path: Path, seed: int) -> None:
    out, alerts = run(tmp_path, seed, outage=True)
    for alert in alerts:
        assert_valid_record(alert)
    start, end = T0 + OUTAGE_START, T0 + OUTAGE_START + OUTAGE_LENGTH
    # Payment failures: within 3 minutes of the outage (2 windows to confirm).
    (payment,) = firing(alerts, "payment_failure")
    assert start - MINUTE <= minute(payment["window"]["start"]) <= start + 3 * MINUTE
    # Support contacts about payments, while the outage lasts.
    (support,) = firing(alerts, "payment_support_contact")
    assert start <= minute(support["window"]["start"]) <= end
    # Abandoned carts show once journeys close: gap + grace after the outage began.
    carts = firing(alerts, "cart_abandonment")
    assert (
        carts
        and start <= minute(carts[0]["window"]["start"]) <= end + GAP_MS + GRACE_MS + 5 * MINUTE
    )
    # Every one of them resolves after the outage, with the same id.
    resolved = {a["alert_id"]: a for a in alerts if a["state"] == "resolved"}
    for alert in (payment, support, carts[0]):
        done = resolved[alert["alert_id"]]
        assert minute(done["resolved_at"]) <= end + GAP_MS + 20 * MINUTE
    assert minute(resolved[payment["alert_id"]]["resolved_at"]) >= end
    assert payment["affected_customers"] > 10 and payment["example_signal_ids"]
    assert {s["rule"] for s in out.records["touchpoints.friction"]} >= {
        "payment_failure", "payment_support_contact", "cart_abandonment",
    }  # fmt: skip


@pytest.mark.parametrize("seed", [1, 4])
def test_the_same_duration_of_normal_traffic_raises_no_alert(tmp_path: Path, seed: int) -> None:
    _out, alerts = run(tmp_path, seed, outage=False)
    assert alerts == []


def test_replaying_the_traffic_raises_the_same_alerts(tmp_path: Path) -> None:
    _o1, first = run(tmp_path, 2, outage=True)
    _o2, second = run(tmp_path, 2, outage=True)
    assert first and first == second
