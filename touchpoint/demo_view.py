"""What ``touchpoint demo`` shows: a snapshot of the pipeline, rendered as lines of text.

Pure: the demo collects a :class:`Snapshot` (ingest counters, the worker's
``/metrics``, alert records from the alerts topic) and :func:`render` turns it
into the screen it redraws on a terminal, or prints as a block elsewhere.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

STAGES = ("awareness", "consideration", "purchase", "retention", "advocacy")
MAX_ALERT_LINES = 8

Samples = dict[str, list[tuple[dict[str, str], float]]]


def parse_metrics(text: str) -> Samples:
    """Prometheus text -> sample name -> [(labels, value)]."""
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((sample.labels, sample.value))
    return samples


def total(samples: Samples, name: str) -> float:
    return sum(value for _labels, value in samples.get(name, ()))


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """Sum of ``name`` per value of ``label`` (other labels summed over)."""
    sums: dict[str, float] = {}
    for labels, value in samples.get(name, ()):
        key = labels.get(label, "")
        sums[key] = sums.get(key, 0.0) + value
    return sums


class Rates:
    """Per-second rates of growing counters over the last ``span_s`` seconds."""

    def __init__(self, span_s: float) -> None:
        self.span_s = span_s
        self._history: deque[tuple[float, Mapping[str, float]]] = deque()

    def add(self, at: float, counters: Mapping[str, float]) -> None:
        self._history.append((at, dict(counters)))
        while len(self._history) > 2 and at - self._history[1][0] >= self.span_s:
            self._history.popleft()

    def rate(self, key: str) -> float:
        if len(self._history) < 2:
            return 0.0
        (t0, first), (t1, last) = self._history[0], self._history[-1]
        if t1 <= t0:
            return 0.0
        return max(0.0, last.get(key, 0.0) - first.get(key, 0.0)) / (t1 - t0)


@dataclass(frozen=True)
class IncidentView:
    kind: str
    start_s: float  # seconds after the demo's traffic started
    end_s: float


@dataclass
class Snapshot:
    """Everything one frame shows; times are wall-clock epoch seconds."""

    started_at: float
    now: float
    broker: str
    redis: str
    incidents: list[IncidentView]
    worker_up: bool = False
    warming_up: bool = False  # the simulator is still simulating the history it skips
    sent: int = 0
    ingested: int = 0
    applied: int = 0
    sent_per_s: float = 0.0
    ingested_per_s: float = 0.0
    applied_per_s: float = 0.0
    dead_letters: int = 0
    dead_by_reason: dict[str, int] = field(default_factory=dict)
    late: int = 0
    active_by_stage: dict[str, float] = field(default_factory=dict)
    completed_by_outcome: dict[str, float] = field(default_factory=dict)
    signals_total: dict[str, float] = field(default_factory=dict)
    signals_per_min: dict[str, float] = field(default_factory=dict)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    spikes: str = ""
    metrics_urls: list[str] = field(default_factory=list)
    lookup_url: str = ""
    example_customer: str | None = None
    redis_key: str | None = None


def _n(value: float) -> str:
    return f"{round(value):,}"


def _clock(epoch_s: float) -> str:
    return datetime.fromtimestamp(epoch_s, UTC).strftime("%H:%M:%S")


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


def _pairs(counts: Iterable[tuple[str, float]]) -> str:
    return "   ".join(f"{key} {_n(value)}" for key, value in counts)


def incident_line(snap: Snapshot, incident: IncidentView) -> str:
    elapsed = snap.now - snap.started_at
    if elapsed < incident.start_s:
        status = f"starts in {incident.start_s - elapsed:.0f} s"
    elif elapsed < incident.end_s:
        status = f"ACTIVE, ends in {incident.end_s - elapsed:.0f} s"
    else:
        status = "over"
    begin, end = snap.started_at + incident.start_s, snap.started_at + incident.end_s
    return (
        f"incident       {incident.kind}: +{incident.start_s:.0f} s to +{incident.end_s:.0f} s "
        f"({_clock(begin)}-{_clock(end)} UTC)   {status}"
    )


def alert_lines(snap: Snapshot) -> list[str]:
    """Firing alerts first (oldest first), then resolved ones (latest first)."""
    firing = [a for a in snap.alerts if a["state"] == "firing"]
    resolved = [a for a in snap.alerts if a["state"] == "resolved"]
    firing.sort(key=lambda a: (a["fired_at"], a["rule"], a["channel"] != "all", a["channel"]))
    resolved.sort(key=lambda a: a.get("resolved_at", ""), reverse=True)
    lines = []
    for alert in firing + resolved:
        series = f"{alert['rule']} / {alert['channel']}"
        fired = _epoch(alert["fired_at"])
        if alert["state"] == "firing":
            when = f"since {_clock(fired)} (+{fired - snap.started_at:.0f} s)"
        else:
            when = f"fired {_clock(fired)}, resolved {_clock(_epoch(alert['resolved_at']))}"
        baseline = alert["baseline"]
        lines.append(
            f"  {alert['state'].upper():9} {series:34} {alert['value']:>5} in "
            f"{alert['window']['size_s']} s  vs baseline {baseline['mean']:.1f} "
            f"± {baseline['stddev']:.1f}, threshold {alert['threshold']:.1f}   {when}"
        )
    if len(lines) > MAX_ALERT_LINES:
        hidden = len(lines) - MAX_ALERT_LINES + 1
        lines = [*lines[: MAX_ALERT_LINES - 1], f"  ... and {hidden} more"]
    return lines or ["  none yet"]


def render(snap: Snapshot) -> list[str]:
    """The demo screen, one string per line."""
    elapsed = snap.now - snap.started_at
    lines = [
        f"Touchpoint demo   +{elapsed:.0f} s   {_clock(snap.now)} UTC   Ctrl-C stops",
        f"broker         {snap.broker}",
        f"redis          {snap.redis}",
        *(incident_line(snap, incident) for incident in snap.incidents),
        "",
        f"throughput     in {_n(snap.ingested_per_s)} events/s   applied "
        f"{_n(snap.applied_per_s)} events/s   "
        + (
            "(simulator: preparing the shop's history ...)"
            if snap.warming_up
            else f"(simulated {_n(snap.sent_per_s)}/s)"
        ),
        f"totals         sent {_n(snap.sent)}   ingested {_n(snap.ingested)}   "
        f"applied {_n(snap.applied)}",
        f"dead letters   {_n(snap.dead_letters)}   "
        f"{_pairs(sorted(snap.dead_by_reason.items(), key=lambda kv: -kv[1])) or '-'}",
        f"late events    {_n(snap.late)}",
        "",
    ]
    if not snap.worker_up:
        lines += ["worker         starting (journeys, signals and alerts follow) ...", ""]
    live = sum(snap.active_by_stage.values())
    stages = [(stage, snap.active_by_stage.get(stage, 0.0)) for stage in STAGES]
    if snap.active_by_stage.get("none"):
        stages.append(("no stage yet", snap.active_by_stage["none"]))
    outcomes = sorted(
        ((outcome, n) for outcome, n in snap.completed_by_outcome.items() if n),
        key=lambda kv: -kv[1],
    )
    lines += [
        f"active journeys by stage ({_n(live)} live)",
        "  " + " -> ".join(f"{stage} {_n(n)}" for stage, n in stages),
        f"journeys completed by outcome ({_n(sum(snap.completed_by_outcome.values()))})",
        "  " + (_pairs(outcomes) or "none yet (a journey closes after its inactivity gap)"),
        "",
        f"friction signals {'rule':26} {'total':>9} {'per min (last 30 s)':>21}",
    ]
    rules = sorted(snap.signals_total, key=lambda r: -snap.signals_total[r])
    for rule in rules:
        lines.append(
            f"  {rule:41} {_n(snap.signals_total[rule]):>9} "
            f"{_n(snap.signals_per_min.get(rule, 0.0)):>21}"
        )
    if not rules:
        lines.append("  none yet")
    lines += ["", f"alerts         {snap.spikes}", *alert_lines(snap), ""]
    lines.append("metrics        " + "   ".join(snap.metrics_urls))
    if snap.example_customer:
        lookup = snap.lookup_url.replace("<customer>", snap.example_customer)
        mirror = f"   (Redis: GET {snap.redis_key})" if snap.redis_key else ""
        lines.append(f"journey lookup {lookup}{mirror}")
    else:
        lines.append(f"journey lookup {snap.lookup_url}")
    return lines
