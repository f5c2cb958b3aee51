"""The demo's screen (pure rendering) and its rules-file adaptation."""

from __future__ import annotations

from pathlib import Path

from streams.core.rules import DEFAULT_RULES_FILE, load_rules
from touchpoint.demo import DEMO_SPIKES, demo_rules_file, with_spike_settings
from touchpoint.demo_view import (
    IncidentView,
    Rates,
    Snapshot,
    alert_lines,
    by_label,
    parse_metrics,
    render,
    total,
)

T0 = 1_790_000_000.0  # 2026-09-21T14:13:20Z

METRICS = """\
# HELP touchpoint_events_out_total Touchpoints applied.
# TYPE touchpoint_events_out_total counter
touchpoint_events_out_total{channel="web",event_type="page_view"} 120.0
touchpoint_events_out_total{channel="app",event_type="screen_view"} 30.0
touchpoint_events_out_created{channel="web",event_type="page_view"} 1.79e+09
# HELP touchpoint_friction_signals_total Signals.
# TYPE touchpoint_friction_signals_total counter
touchpoint_friction_signals_total{channel="web",rule="payment_failure"} 7.0
touchpoint_friction_signals_total{channel="app",rule="payment_failure"} 2.0
touchpoint_friction_signals_total{channel="email",rule="email_friction"} 1.0
# HELP touchpoint_journeys_active Open journeys.
# TYPE touchpoint_journeys_active gauge
touchpoint_journeys_active{stage="awareness"} 5.0
touchpoint_journeys_active{stage="purchase"} 2.0
"""


def alert(state: str, rule: str, channel: str, fired: str, **extra: object) -> dict:
    return {
        "alert_id": f"al-{rule}-{channel}",
        "state": state,
        "rule": rule,
        "channel": channel,
        "value": 22,
        "window": {"start": fired, "end": fired, "size_s": 5},
        "baseline": {"mean": 1.24, "stddev": 1.6},
        "threshold": 5.9,
        "fired_at": fired,
        **extra,
    }


def snapshot(**fields: object) -> Snapshot:
    base: dict = {
        "started_at": T0,
        "now": T0 + 70,
        "broker": "embedded Tansu at 127.0.0.1:1 (in memory)",
        "redis": "off",
        "incidents": [IncidentView("payment_outage", 60, 180)],
    }
    return Snapshot(**{**base, **fields})


def test_metrics_are_summed_by_label_and_created_samples_ignored() -> None:
    samples = parse_metrics(METRICS)
    assert total(samples, "touchpoint_events_out_total") == 150
    assert by_label(samples, "touchpoint_friction_signals_total", "rule") == {
        "payment_failure": 9,
        "email_friction": 1,
    }
    assert by_label(samples, "touchpoint_journeys_active", "stage") == {
        "awareness": 5,
        "purchase": 2,
    }
    assert total(samples, "touchpoint_nothing_total") == 0


def test_rates_cover_the_span_and_never_go_negative() -> None:
    rates = Rates(span_s=5)
    assert rates.rate("a") == 0
    for second in range(11):
        rates.add(T0 + second, {"a": 100 * second, "b": 50 - second})
    assert rates.rate("a") == 100
    assert rates.rate("b") == 0
    assert rates.rate("missing") == 0


def test_the_screen_shows_every_section() -> None:
    samples = parse_metrics(METRICS)
    lines = render(
        snapshot(
            worker_up=True,
            ingested=150,
            ingested_per_s=301.4,
            applied_per_s=299.6,
            dead_letters=3,
            dead_by_reason={"malformed_json": 2, "wrong_type": 1},
            active_by_stage=by_label(samples, "touchpoint_journeys_active", "stage"),
            completed_by_outcome={"converted": 4, "browse_only": 9},
            signals_total={"payment_failure": 9, "email_friction": 1},
            signals_per_min={"payment_failure": 18},
            alerts=[alert("firing", "payment_failure", "all", "2026-09-21T14:14:25Z")],
            metrics_urls=["http://127.0.0.1:6066/metrics (worker)"],
            lookup_url="http://127.0.0.1:6066/journeys/<customer>/",
            example_customer="cust-000042",
            redis_key="touchpoint:journey:cust-000042",
        )
    )
    text = "\n".join(lines)
    assert "in 301 events/s   applied 300 events/s" in text
    assert "dead letters   3   malformed_json 2   wrong_type 1" in text
    assert "awareness 5 -> consideration 0 -> purchase 2 -> retention 0 -> advocacy 0" in text
    assert "journeys completed by outcome (13)" in text
    assert "browse_only 9   converted 4" in text
    (payment,) = [line for line in lines if line.strip().startswith("payment_failure")]
    assert payment.split()[1:] == ["9", "18"]
    assert "ACTIVE, ends in 110 s" in text
    assert "FIRING    payment_failure / all" in text
    assert "http://127.0.0.1:6066/journeys/cust-000042/" in text
    assert "touchpoint:journey:cust-000042" in text


def test_alerts_list_firing_first_then_resolved_and_say_since_when() -> None:
    lines = alert_lines(
        snapshot(
            alerts=[
                alert(
                    "resolved",
                    "payment_failure",
                    "app",
                    "2026-09-21T14:14:30Z",
                    resolved_at="2026-09-21T14:16:00Z",
                ),
                alert("firing", "payment_failure", "web", "2026-09-21T14:14:25Z"),
                alert("firing", "payment_failure", "all", "2026-09-21T14:14:25Z"),
            ]
        )
    )
    assert [line.split()[0:4] for line in lines] == [
        ["FIRING", "payment_failure", "/", "all"],
        ["FIRING", "payment_failure", "/", "web"],
        ["RESOLVED", "payment_failure", "/", "app"],
    ]
    assert "22 in 5 s  vs baseline 1.2 ± 1.6, threshold 5.9" in lines[0]
    assert lines[0].endswith("since 14:14:25 (+65 s)")
    assert lines[2].endswith("fired 14:14:30, resolved 14:16:00")
    assert alert_lines(snapshot()) == ["  none yet"]


def test_before_the_worker_answers_the_screen_says_so() -> None:
    text = "\n".join(
        render(snapshot(now=T0 + 5, completed_by_outcome={"converted": 0.0}, warming_up=True))
    )
    assert "worker         starting" in text
    assert "(simulator: preparing the shop's history ...)" in text
    assert "journeys completed by outcome (0)\n  none yet" in text
    assert "starts in 55 s" in text
    assert "journey lookup" in text


def test_the_demo_rules_are_the_built_in_rules_with_demo_spike_settings(tmp_path: Path) -> None:
    built_in = load_rules(DEFAULT_RULES_FILE)
    demo = load_rules(demo_rules_file(tmp_path))
    assert [r.name for r in demo.rules] == [r.name for r in built_in.rules]
    assert demo.spikes.window_ms == 5_000 != built_in.spikes.window_ms
    assert demo.spikes.min_count == int(DEMO_SPIKES["min_count"])
    assert demo.spikes.warmup_windows == int(DEMO_SPIKES["warmup_windows"])
    # Settings the demo does not touch keep the file's values.
    assert demo.spikes.threshold_sigma == built_in.spikes.threshold_sigma
    assert demo.spikes.fire_windows == built_in.spikes.fire_windows


def test_spike_settings_missing_from_the_file_are_added() -> None:
    text = '[spikes]\nwindow = "1m"  # a comment\n\n[[rule]]\nname = "x"\n'
    out = with_spike_settings(text, {"window": '"5s"', "min_count": "3"})
    assert out.startswith('[spikes]\nmin_count = 3\nwindow = "5s"  # a comment\n')
    assert out.endswith('[[rule]]\nname = "x"\n')
