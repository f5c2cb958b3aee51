"""The crash test's comparison with an undisturbed run, on hand-made accountings (no Kafka)."""

from __future__ import annotations

from typing import Any

from tests.reliability import Accounting, Traffic, compare

STITCHED = "cust-stitched"


def _traffic() -> Traffic:
    return Traffic(
        records=[], valid=set(), key_of={}, late=set(), junk=set(), closers=[], stitched={STITCHED}
    )


def _alert(alert_id: str, state: str, value: int, minute: int) -> dict[str, Any]:
    return {
        "alert_id": alert_id,
        "state": state,
        "value": value,
        "rule": "payment_failure",
        "channel": "all",
        "window": {
            "start": f"2026-09-21T14:{minute:02d}:00+00:00",
            "end": f"2026-09-21T14:{minute + 1:02d}:00+00:00",
        },
    }


def _signal(customer: str, minute: int) -> dict[str, Any]:
    return {
        "customer_id": customer,
        "rule": "payment_failure",
        "channel": "web",
        "occurred_at": f"2026-09-21T14:{minute:02d}:30+00:00",
    }


def _run(*alerts: dict[str, Any], signals: dict[str, dict[str, Any]]) -> Accounting:
    acc = Accounting()
    acc.alert_by_key = {(a["alert_id"], a["state"]): a for a in alerts}
    acc.signal_by_id = signals
    return acc


def _only_problem(disturbed: Accounting, reference: Accounting, starts: str) -> str:
    """The one problem compare() reports, checked to start with ``starts``."""
    problems = compare(_traffic(), disturbed, reference)
    assert len(problems) == 1, problems
    assert problems[0].startswith(starts), problems[0]
    return problems[0]


def test_an_alert_resolving_in_another_window_because_of_a_stitched_signal_is_not_a_difference() -> (
    None
):
    # Both runs fire alike (minute 20, no stitched signal) and resolve in
    # different windows: minute 24 holds a stitched customer's signal in one run.
    signals = {"s1": _signal(STITCHED, 24)}
    disturbed = _run(
        _alert("al-1", "firing", 9, 20), _alert("al-1", "resolved", 0, 25), signals=signals
    )
    reference = _run(
        _alert("al-1", "firing", 9, 20), _alert("al-1", "resolved", 1, 24), signals=signals
    )
    assert compare(_traffic(), disturbed, reference) == []


def test_a_value_differing_where_no_stitched_signal_falls_is_reported() -> None:
    signals = {"s1": _signal(STITCHED, 24), "s2": _signal("cust-plain", 20)}
    disturbed = _run(
        _alert("al-1", "firing", 8, 20), _alert("al-1", "resolved", 0, 25), signals=signals
    )
    reference = _run(
        _alert("al-1", "firing", 9, 20), _alert("al-1", "resolved", 1, 24), signals=signals
    )
    problem = _only_problem(
        disturbed,
        reference,
        "alert values differ (this run, then the undisturbed one): "
        "[('al-1', 'firing', 8)] / [('al-1', 'firing', 9)]",
    )
    # The signals per minute say whose signals fell where.
    assert "{'2026-09-21T14:20': '1 [0]', '2026-09-21T14:24': '1 [1]'}" in problem


def test_an_alert_only_one_run_raises_where_no_stitched_signal_falls_is_reported() -> None:
    signals = {"s1": _signal(STITCHED, 30)}
    disturbed = _run(
        _alert("al-1", "firing", 9, 20), _alert("al-3", "firing", 5, 30), signals=signals
    )
    reference = _run(
        _alert("al-2", "firing", 9, 20), _alert("al-3", "firing", 6, 30), signals=signals
    )
    _only_problem(
        disturbed,
        reference,
        "alerts differ (this run, then the undisturbed one): "
        "[('al-1', 'firing', 9)] / [('al-2', 'firing', 9)]",
    )


def test_an_alert_only_one_run_raises_where_a_stitched_signal_falls_is_not_a_difference() -> None:
    signals = {"s1": _signal(STITCHED, 37), "s2": _signal("cust-plain", 20)}
    both = _alert("al-1", "firing", 9, 20)
    disturbed = _run(both, _alert("al-2", "firing", 7, 37), signals=signals)
    reference = _run(both, signals=signals)
    assert compare(_traffic(), disturbed, reference) == []


def test_no_alert_left_to_compare_is_a_problem() -> None:
    signals = {"s1": _signal(STITCHED, 20)}
    run = _run(_alert("al-1", "firing", 9, 20), signals=signals)
    assert compare(_traffic(), run, run) == [
        "no alert to compare: stitched signals fall in every alert's windows"
    ]
