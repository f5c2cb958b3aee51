"""Spike alerts on friction signals (§7), pure.

Signals are counted per rule and channel (and per rule over all channels) in
event-time windows. Every worker partition reports its cumulative counts per
open window together with its stream time (:class:`Partial`); the
:class:`WindowAggregator` closes a window once the stream time of every
partition has passed its end plus ``lateness`` (partitions silent on the wall
clock for ``max_silence_s`` do not hold it back), so windows close on the
stream's own time and a replay closes the same windows with the same counts.

Each closed window feeds a :class:`Detector` per series: an EWMA mean and
variance that keep learning (a new normal stops alerting), a warm-up before
anything can fire, a threshold of ``mean + k * sigma`` and at least ``min_count``,
hysteresis to resolve (below ``mean + k_resolve * sigma`` for several windows) and
a cooldown after resolving. An alert's id is derived from its series and the
window it fired in: firing and resolved records share it, and a replay gives
the same one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from typing import Any

import msgspec
from xxhash import xxh3_64_intdigest

from schemas.registry import uri_for
from streams.core.clock import iso_ms
from streams.core.rules import SpikeConfig

ALERT = uri_for("alert")
ALL_CHANNELS = "all"
SEVERITY = {"high": "critical", "medium": "warning", "low": "info"}
SAMPLE = 20
SLOW_LEARNING = 0.2


class SeriesCount(msgspec.Struct, array_like=True):
    """One partition's cumulative count of one series in one window."""

    count: int
    customers: int
    customer_sample: list[str]
    signal_sample: list[str]


class Partial(msgspec.Struct):
    """A partition's report: its stream time and its counts for the windows still open."""

    partition: int
    stream_time: int
    # window start (ms, as str: JSON object keys) -> "rule|channel" -> count
    windows: dict[str, dict[str, SeriesCount]]


class DetectorState(msgspec.Struct, array_like=True):
    windows: int = 0
    mean: float = 0.0
    var: float = 0.0
    status: str = "ok"  # ok | firing | cooldown
    alert_id: str = ""
    fired_at: int = 0
    below: int = 0
    cooldown: int = 0
    above: int = 0  # recent windows above the threshold, one bit each (newest lowest)


class Detector:
    """EWMA baseline + threshold + hysteresis for one series."""

    def __init__(self, config: SpikeConfig) -> None:
        self.config = config

    def sigma(self, state: DetectorState) -> float:
        # Counts are Poisson-like: never trust a deviation below sqrt(mean) (or 1).
        return max(math.sqrt(state.var), math.sqrt(state.mean), 1.0)

    def threshold(self, state: DetectorState) -> float:
        return max(
            float(self.config.min_count),
            state.mean + self.config.threshold_sigma * self.sigma(state),
        )

    def observe(self, state: DetectorState, value: int) -> str | None:
        """Feed one closed window; returns "firing", "resolved" or None. Learns either way."""
        config = self.config
        if state.windows == 0 and value == 0:
            return None  # no baseline before the series' first signal (cold start)
        transition = None
        elevated = False
        if state.windows >= config.warmup_windows:
            limit = self.threshold(state)
            calm = state.mean + config.resolve_sigma * self.sigma(state)
            elevated = value > calm
            anomalous = value >= config.min_count and value > limit
            if state.status == "firing":
                state.below = state.below + 1 if value <= calm else 0
                if state.below >= config.resolve_windows:
                    state.status = "cooldown"
                    state.cooldown = config.cooldown_windows
                    transition = "resolved"
            elif state.status == "cooldown":
                state.cooldown -= 1
                if state.cooldown <= 0:
                    state.status = "ok"
            else:
                # Fire when fire_windows of the last fire_windows + 1 windows were
                # above the threshold: persistent, yet one dip does not reset it.
                span = config.fire_windows + (config.fire_windows > 1)
                state.above = ((state.above << 1) | anomalous) & ((1 << span) - 1)
                if anomalous and bin(state.above).count("1") >= config.fire_windows:
                    state.status = "firing"
                    state.below = 0
                    state.above = 0
                    transition = "firing"
        # Learn: plain average during warm-up, then EWMA. Unusually high windows
        # (above the calm level) and windows while firing weigh less
        # (SLOW_LEARNING): the threshold must not chase a rising incident, yet a
        # lasting new level still becomes the baseline.
        state.windows += 1
        alpha = max(config.alpha, 1.0 / state.windows)
        if elevated or state.status == "firing":
            alpha *= SLOW_LEARNING
        delta = value - state.mean
        state.mean += alpha * delta
        state.var = (1 - alpha) * (state.var + alpha * delta * delta)
        return transition


class AlertState(msgspec.Struct):
    """Everything the alerting stage keeps (persisted in one table entry)."""

    last_closed: int = -1  # start of the last closed window (-1: none yet)
    stream_times: dict[str, int] = msgspec.field(default_factory=dict)
    # window start -> partition -> "rule|channel" -> count
    windows: dict[str, dict[str, dict[str, SeriesCount]]] = msgspec.field(default_factory=dict)
    detectors: dict[str, DetectorState] = msgspec.field(default_factory=dict)


class WindowAggregator:
    def __init__(
        self,
        config: SpikeConfig,
        partitions: int,
        series: Iterable[tuple[str, str]],
        severity_of: dict[str, str],
        *,
        overrides: dict[str, SpikeConfig] | None = None,
        state: AlertState | None = None,
        wall: Callable[[], float] = time.monotonic,
        max_silence_s: float = 30.0,
        max_windows_per_step: int = 100_000,
    ) -> None:
        self.config = config
        self.partitions = partitions
        self.series = sorted(set(series))
        self.severity_of = severity_of
        self.state = state or AlertState()
        self.detector = Detector(config)
        self.detectors = {rule: Detector(c) for rule, c in (overrides or {}).items()}
        self.wall = wall
        self.max_silence_s = max_silence_s
        self.max_windows_per_step = max_windows_per_step
        self._heard: dict[int, float] = {}
        self._started = wall()
        # Observability: signals reported for windows already closed (they were
        # not counted), and partitions currently skipped as silent.
        self.late_signals = 0
        self.silent: set[int] = set()
        # window start -> partition -> series -> count as closed (recent windows only)
        self._closed: dict[int, dict[str, dict[str, int]]] = {}
        # series -> signals in the latest closed window (for metrics; not persisted).
        self.last_counts: dict[str, int] = {}

    def update(self, partial: Partial) -> None:
        """A partition's latest report (cumulative counts: keeping the larger is idempotent)."""
        state = self.state
        p = str(partial.partition)
        self._heard[partial.partition] = self.wall()
        # A worker that took the partition over (crash, rebalance) replays
        # from the last commit: its stream time and counts grow back from what
        # the state it recovered holds. Neither may shrink what was reported,
        # but its counts may add to it (the last reports before a crash can be
        # lost, and a window is pruned once replayed past).
        state.stream_times[p] = max(state.stream_times.get(p, -1), partial.stream_time)
        for start, counts in partial.windows.items():
            if int(start) <= state.last_closed:
                # That window is closed; late contributions do not reopen it,
                # but they are counted so operators can see them.
                closed_window = self._closed.get(int(start))
                if closed_window is None:
                    continue  # closed long ago or before a restart: nothing to compare
                closed = closed_window.setdefault(p, {})
                for key, c in counts.items():
                    if c.count > closed.get(key, 0):
                        self.late_signals += c.count - closed.get(key, 0)
                        closed[key] = c.count
                continue
            # The larger count wins, also in a report that is not behind in
            # stream time: a counter can have lost signals it reported
            # (restored from an older meta record, or a pruned window
            # re-created); those stay counted.
            kept = state.windows.setdefault(start, {}).setdefault(p, {})
            for key, c in counts.items():
                if key not in kept or c.count > kept[key].count:
                    kept[key] = c

    def _floor(self) -> int | None:
        """Stream time every partition has passed (None: wait).

        A partition that has not reported yet holds the windows back (its
        signals may still come) until it has been silent for max_silence_s on
        the wall clock; so does any partition, counted from its last report.
        """
        now = self.wall()
        times = []
        for p in range(self.partitions):
            if now - self._heard.get(p, self._started) > self.max_silence_s:
                self.silent.add(p)
                continue  # silent: must not stall alerting for everyone
            self.silent.discard(p)
            t = self.state.stream_times.get(str(p))
            if t is None:
                return None
            times.append(t)
        return min(times) if times else None

    def close_ready(self) -> list[dict[str, Any]]:
        """Close every window the stream time has passed; returns alert records."""
        floor = self._floor()
        if floor is None:
            return []
        size = self.config.window_ms
        state = self.state
        if state.last_closed < 0:
            first = min((int(s) for s in state.windows), default=None)
            if first is None:
                return []
            state.last_closed = first - size
        alerts: list[dict[str, Any]] = []
        steps = 0
        while state.last_closed + 2 * size + self.config.lateness_ms <= floor:
            start = state.last_closed + size
            alerts += self._close(start)
            state.last_closed = start
            steps += 1
            if steps >= self.max_windows_per_step:
                break
        return alerts

    def _close(self, start: int) -> list[dict[str, Any]]:
        per_partition = self.state.windows.pop(str(start), {})
        self._closed[start] = {
            p: {key: c.count for key, c in counts.items()} for p, counts in per_partition.items()
        }
        horizon = start - 10 * self.config.window_ms - self.config.lateness_ms
        for old in [w for w in self._closed if w < horizon]:
            del self._closed[old]
        totals: dict[str, SeriesCount] = {}
        for counts in per_partition.values():
            for key, c in counts.items():
                total = totals.get(key)
                if total is None:
                    totals[key] = SeriesCount(
                        c.count, c.customers, list(c.customer_sample), list(c.signal_sample)
                    )
                else:
                    total.count += c.count
                    total.customers += c.customers  # customers are partitioned: counts add up
                    total.customer_sample = (total.customer_sample + c.customer_sample)[:SAMPLE]
                    total.signal_sample = (total.signal_sample + c.signal_sample)[:SAMPLE]
        alerts = []
        for rule, channel in self.series:
            key = f"{rule}|{channel}"
            total = totals.get(key) or SeriesCount(0, 0, [], [])
            detector = self.state.detectors.get(key)
            if detector is None:
                detector = self.state.detectors[key] = DetectorState()
            logic = self.detectors.get(rule, self.detector)  # a rule's own [spike] overrides
            baseline = (detector.mean, logic.sigma(detector), logic.threshold(detector))
            self.last_counts[key] = total.count
            transition = logic.observe(detector, total.count)
            if transition is not None:
                alerts.append(
                    self._alert(rule, channel, start, total, detector, baseline, transition)
                )
        return alerts

    def _alert(
        self,
        rule: str,
        channel: str,
        start: int,
        total: SeriesCount,
        detector: DetectorState,
        baseline: tuple[float, float, float],
        transition: str,
    ) -> dict[str, Any]:
        size = self.config.window_ms
        end = start + size
        if transition == "firing":
            detector.alert_id = (
                f"al-{rule}-{channel}-{iso_ms(start).replace(':', '').replace('-', '')[:-5]}"
            )
            detector.fired_at = end
        mean, sigma, threshold = baseline
        record: dict[str, Any] = {
            "schema": ALERT,
            "alert_id": detector.alert_id,
            "state": transition,
            "rule": rule,
            "channel": channel,
            "severity": SEVERITY.get(self.severity_of.get(rule, "medium"), "warning"),
            "window": {"start": iso_ms(start), "end": iso_ms(end), "size_s": size // 1000},
            "value": total.count,
            "baseline": {"mean": round(mean, 3), "stddev": round(sigma, 3)},
            "threshold": round(threshold, 3),
            "affected_customers": total.customers,
            "customer_sample": total.customer_sample[:SAMPLE],
            "example_signal_ids": total.signal_sample[:SAMPLE],
            "fired_at": iso_ms(detector.fired_at),
            "description": (
                f"{rule} on {channel}: {total.count} signals in {size // 1000} s "
                f"(baseline {mean:.1f} ± {sigma:.1f}, threshold {threshold:.1f})"
            ),
        }
        if transition == "resolved":
            record["resolved_at"] = iso_ms(end)
        return record

    def firing(self) -> dict[str, str]:
        """series -> alert id for the alerts firing now."""
        return {k: d.alert_id for k, d in self.state.detectors.items() if d.status == "firing"}


class WindowCounter:
    """A partition's cumulative signal counts per open window (the worker side).

    Counting is idempotent: a signal id already counted in a window is not
    counted again. After a crash the worker re-applies the bundles since its
    last flush and emits their signals again (same ids); the counts restored
    from the flushed meta record may already hold some of them.
    """

    def __init__(self, window_ms: int, max_customers: int = 5_000) -> None:
        self.window_ms = window_ms
        self.max_customers = max_customers
        # window start -> "rule|channel" -> [count, customer set, signal sample, id hashes]
        self.windows: dict[int, dict[str, list[Any]]] = {}

    def add(self, at: int, rule: str, channel: str, customer: str, signal_id: str) -> None:
        start = at - at % self.window_ms
        window = self.windows.setdefault(start, {})
        h = xxh3_64_intdigest(signal_id.encode())
        for key in (f"{rule}|{channel}", f"{rule}|{ALL_CHANNELS}"):
            entry = window.get(key)
            if entry is None:
                entry = window[key] = [0, set(), [], set()]
            if h in entry[3]:
                continue  # counted before (a replay after a crash)
            entry[3].add(h)
            entry[0] += 1
            if len(entry[1]) < self.max_customers:
                entry[1].add(customer)
            if len(entry[2]) < SAMPLE:
                entry[2].append(signal_id)

    def partial(self, partition: int, stream_time: int) -> Partial:
        return Partial(
            partition,
            stream_time,
            {
                str(start): {
                    key: SeriesCount(n, len(customers), sorted(customers)[:SAMPLE], sample)
                    for key, (n, customers, sample, _ids) in series.items()
                }
                for start, series in self.windows.items()
            },
        )

    def prune(self, stream_time: int, lateness_ms: int) -> None:
        """Forget windows every aggregator has closed by now."""
        horizon = stream_time - lateness_ms - 3 * self.window_ms
        for start in [s for s in self.windows if s < horizon]:
            del self.windows[start]

    def dump(self) -> list[Any]:
        return [
            [start, key, n, sorted(customers), sample, sorted(ids)]
            for start, series in self.windows.items()
            for key, (n, customers, sample, ids) in series.items()
        ]

    def load(self, rows: list[Any]) -> None:
        for row in rows:
            start, key, n, customers, sample = row[:5]
            ids = set(row[5]) if len(row) > 5 else set()  # rows written before ids were kept
            self.windows.setdefault(start, {})[key] = [n, set(customers), list(sample), ids]
