"""Traffic scenarios shared by the alert tests (in-process and against the broker)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from streams.core.rules import DEFAULT_RULES_FILE
from streams.core.sessionizer import MINUTE
from touchpoint.simulator import Incident, Simulator

T0 = 1_790_000_000_000 - 1_790_000_000_000 % MINUTE  # 2026-09-21T13:33Z, a whole minute
RATE = 50.0
MINUTES = 60
OUTAGE_START = 30 * MINUTE
OUTAGE_LENGTH = 10 * MINUTE
# Shorter journeys and cart deadline than production, so a one-hour scenario
# covers warm-up, the incident and its aftermath.
JOURNEY_ENV = {"TOUCHPOINT_JOURNEY_GAP_MINUTES": "10", "TOUCHPOINT_JOURNEY_GRACE_MINUTES": "1"}
GAP_MS = 10 * MINUTE
GRACE_MS = MINUTE


def scenario_rules(directory: Path) -> Path:
    """The built-in rules, with the cart deadline shortened to 15 minutes."""
    text = DEFAULT_RULES_FILE.read_text().replace('within = "1h"', 'within = "15m"')
    assert 'within = "15m"' in text
    path = directory / "rules.toml"
    path.write_text(text)
    return path


def traffic(seed: int, outage: bool, anonymous_share: float = 0.3) -> list[dict[str, Any]]:
    incidents = (
        [Incident("payment_outage", OUTAGE_START / 1000, OUTAGE_LENGTH / 1000)] if outage else []
    )
    sim = Simulator(
        seed=seed,
        start_ms=T0,
        rate=RATE,
        customers=int(RATE * 1000),
        incidents=incidents,
        anonymous_share=anonymous_share,
    )
    return [event for _source, event in sim.until(T0 + MINUTES * MINUTE)]
