"""Spike detection and window aggregation without Kafka (fake wall clock)."""

from __future__ import annotations

import dataclasses
import random

import msgspec

from streams.core.rules import SpikeConfig
from streams.core.spikes import (
    AlertState,
    Detector,
    DetectorState,
    Partial,
    WindowAggregator,
    WindowCounter,
)
from tests.reference import assert_valid_record

MIN = 60_000
T0 = 1_793_607_300_000 - 1_793_607_300_000 % MIN
CONFIG = SpikeConfig(window_ms=MIN, lateness_ms=0, warmup_windows=10, min_count=5, fire_windows=1)


def feed(detector: Detector, state: DetectorState, values: list[int]) -> list[str | None]:
    return [detector.observe(state, v) for v in values]


def test_warm_up_then_fire_once_then_resolve_with_hysteresis() -> None:
    d, s = Detector(CONFIG), DetectorState()
    rng = random.Random(1)
    normal = [rng.choice([1, 2, 2, 3]) for _ in range(30)]
    assert set(feed(d, s, [50, *normal[:9]])) == {None}  # a spike during warm-up: no alert
    assert set(feed(d, s, normal[9:])) == {None}
    assert feed(d, s, [40, 45, 42]) == ["firing", None, None]  # once, not per window
    # Back to normal: resolves after resolve_windows calm windows, not at the first one.
    assert feed(d, s, [2, 2]) == [None, "resolved"]
    assert feed(d, s, [40] * 5) == [None] * 5  # cooldown: no flapping


def test_a_new_normal_stops_alerting() -> None:
    d, s = Detector(CONFIG), DetectorState()
    feed(d, s, [2] * 20)
    outcome = feed(d, s, [30] * 80)
    assert outcome[0] == "firing"
    assert "resolved" in outcome  # the baseline learned 30 as the new normal
    assert outcome.count("firing") == 1
    assert s.mean > 25


def test_a_single_noisy_window_does_not_fire_when_two_are_required() -> None:
    config = SpikeConfig(window_ms=MIN, warmup_windows=10, min_count=5, fire_windows=2)
    d, s = Detector(config), DetectorState()
    feed(d, s, [2] * 15)
    assert feed(d, s, [20, 2, 2, 20, 2, 2]) == [None] * 6  # isolated noisy minutes
    assert feed(d, s, [20, 3, 22]) == [None, None, "firing"]  # two of three: one dip allowed


def test_small_counts_never_fire() -> None:
    d, s = Detector(CONFIG), DetectorState()
    assert set(feed(d, s, [0] * 30 + [4, 4, 4])) == {None}  # below min_count


def partial(p: int, stream_time: int, counts: dict[int, dict[str, int]]) -> Partial:
    from streams.core.spikes import SeriesCount

    return Partial(
        p,
        stream_time,
        {
            str(start): {k: SeriesCount(n, n, [f"c{p}-{i}" for i in range(n)][:20], [f"s{i}" for i in range(n)][:20])
                         for k, n in series.items()}
            for start, series in counts.items()
        },
    )  # fmt: skip


class Wall:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def aggregator(wall: Wall, state: AlertState | None = None) -> WindowAggregator:
    return WindowAggregator(
        CONFIG,
        partitions=2,
        series=[("payment_failure", "web"), ("payment_failure", "all")],
        severity_of={"payment_failure": "high"},
        state=state,
        wall=wall,
    )


def test_windows_close_when_every_partition_has_passed_them() -> None:
    wall = Wall()
    agg = aggregator(wall)
    key = "payment_failure|web"
    for i in range(12):  # warm-up with 2 signals a minute from each partition
        agg.update(
            partial(0, T0 + (i + 1) * MIN, {T0 + i * MIN: {key: 1, "payment_failure|all": 1}})
        )
        agg.update(
            partial(1, T0 + (i + 1) * MIN, {T0 + i * MIN: {key: 1, "payment_failure|all": 1}})
        )
        assert agg.close_ready() == []
    spike = T0 + 12 * MIN
    agg.update(partial(0, spike + MIN, {spike: {key: 20, "payment_failure|all": 20}}))
    assert agg.close_ready() == []  # partition 1 has not passed the window yet
    agg.update(partial(1, spike + MIN, {spike: {key: 15, "payment_failure|all": 15}}))
    alerts = agg.close_ready()  # every partition has passed the window's end
    assert [(a["channel"], a["state"], a["value"]) for a in alerts] == [
        ("all", "firing", 35), ("web", "firing", 35),
    ]  # fmt: skip
    for alert in alerts:
        assert_valid_record(alert)
    assert alerts[1]["affected_customers"] == 35 and alerts[1]["severity"] == "critical"
    assert alerts[1]["alert_id"] == "al-payment_failure-web-20261102T082700"
    assert agg.firing() == {
        key: alerts[1]["alert_id"],
        "payment_failure|all": alerts[0]["alert_id"],
    }


def test_a_partition_that_has_not_reported_holds_the_windows() -> None:
    wall = Wall()
    agg = aggregator(wall)
    agg.update(partial(0, T0 + 30 * MIN, {T0: {"payment_failure|web": 3}}))
    assert agg.close_ready() == [] and agg.state.detectors == {}  # nothing closed
    agg.update(partial(1, T0 + MIN // 2, {T0: {"payment_failure|web": 4}}))
    agg.close_ready()
    assert agg.state.detectors == {}  # partition 1 is still inside the first window
    agg.update(partial(1, T0 + MIN, {T0: {"payment_failure|web": 5}}))
    agg.close_ready()
    assert agg.state.detectors["payment_failure|web"].mean == 8  # 3 + 5: nothing dropped


def test_a_silent_partition_stops_holding_windows_after_a_while() -> None:
    wall = Wall()
    agg = aggregator(wall)
    agg.update(partial(0, T0 + 5 * MIN, {T0: {"payment_failure|web": 1}}))
    agg.update(partial(1, T0 + MIN // 2, {}))
    assert agg.close_ready() == []
    wall.t = 60  # partition 1 silent for a minute on the wall clock
    agg.update(partial(0, T0 + 5 * MIN, {}))
    assert agg.state.last_closed >= -1
    agg.close_ready()
    assert agg.state.last_closed == T0 + 4 * MIN  # every window ending by partition 0's time


def test_replayed_reports_do_not_double_count() -> None:
    wall = Wall()
    agg = aggregator(wall)
    report = partial(0, T0 + MIN, {T0: {"payment_failure|web": 7}})
    agg.update(report)
    agg.update(report)
    agg.update(partial(1, T0 + MIN, {}))
    agg.close_ready()  # only the first window has ended everywhere
    assert agg.state.detectors["payment_failure|web"].windows == 1
    assert agg.state.detectors["payment_failure|web"].mean == 7


def test_a_smaller_count_in_a_later_report_does_not_lower_what_was_reported() -> None:
    # A partition's counter can lose signals it reported: restored from an
    # older meta record after a crash, or a window it pruned re-created by a
    # signal dated that far back. Its next reports are not behind in stream
    # time, and must not take back the signals reported before.
    wall = Wall()
    agg = aggregator(wall)
    agg.update(partial(0, T0 + MIN, {T0: {"payment_failure|web": 7}}))
    agg.update(partial(0, T0 + MIN, {T0: {"payment_failure|web": 3}}))  # not behind
    agg.update(partial(1, T0 + MIN, {}))
    agg.close_ready()  # only the first window has ended everywhere
    assert agg.state.detectors["payment_failure|web"].windows == 1
    assert agg.state.detectors["payment_failure|web"].mean == 7


def test_window_counter_counts_per_channel_and_all_and_reloads() -> None:
    counter = WindowCounter(MIN)
    counter.add(T0 + 5, "payment_failure", "web", "c1", "s1")
    counter.add(T0 + 6, "payment_failure", "app", "c1", "s2")
    counter.add(T0 + MIN, "payment_failure", "web", "c2", "s3")
    report = counter.partial(3, T0 + MIN + 1)
    window = report.windows[str(T0)]
    assert window["payment_failure|web"].count == 1 and window["payment_failure|all"].count == 2
    assert window["payment_failure|all"].customers == 1
    again = WindowCounter(MIN)
    again.load(counter.dump())
    assert again.partial(3, T0 + MIN + 1) == report
    counter.prune(T0 + 10 * MIN, 0)
    assert counter.windows == {}


def test_window_counter_counts_a_signal_once_even_when_replayed_after_a_reload() -> None:
    counter = WindowCounter(MIN)
    counter.add(T0 + 5, "payment_failure", "web", "c1", "s1")
    restored = WindowCounter(MIN)
    restored.load(counter.dump())  # the meta flushed before a crash
    # The bundles since that flush are applied again: s1 comes back, s2 is new.
    restored.add(T0 + 5, "payment_failure", "web", "c1", "s1")
    restored.add(T0 + 7, "payment_failure", "web", "c2", "s2")
    window = restored.partial(0, T0 + MIN).windows[str(T0)]
    assert window["payment_failure|web"].count == 2
    assert window["payment_failure|all"].count == 2
    old_format = WindowCounter(MIN)
    old_format.load([row[:5] for row in counter.dump()])  # metas written before ids were kept
    assert old_format.partial(0, T0 + MIN) == counter.partial(0, T0 + MIN)


def test_signals_reported_after_their_window_closed_are_counted_as_late() -> None:
    wall = Wall()
    agg = aggregator(wall)
    agg.update(partial(0, T0 + 2 * MIN, {T0: {"payment_failure|web": 3}}))
    agg.update(partial(1, T0 + 2 * MIN, {T0: {"payment_failure|web": 2}}))
    agg.close_ready()
    assert agg.state.last_closed >= T0 and agg.late_signals == 0
    closed = msgspec.structs.replace(agg.state.detectors["payment_failure|web"])
    agg.update(partial(0, T0 + 3 * MIN, {T0: {"payment_failure|web": 3}}))  # same count again
    assert agg.late_signals == 0
    agg.update(partial(1, T0 + 3 * MIN, {T0: {"payment_failure|web": 4}}))  # two more, too late
    assert agg.late_signals == 2
    assert agg.state.detectors["payment_failure|web"] == closed  # a closed window stays closed


def test_a_rules_own_spike_settings_override_the_global_ones() -> None:
    def run(overrides: dict[str, SpikeConfig]) -> list[str]:
        agg = WindowAggregator(
            CONFIG,
            partitions=1,
            series=[("payment_failure", "web")],
            severity_of={},
            overrides=overrides,
            wall=Wall(),
        )
        states = []
        for i, n in enumerate([1] * 12 + [20]):
            agg.update(partial(0, T0 + (i + 1) * MIN, {T0 + i * MIN: {"payment_failure|web": n}}))
            states += [a["state"] for a in agg.close_ready()]
        return states

    assert run({}) == ["firing"]
    strict = dataclasses.replace(CONFIG, min_count=50)
    assert run({"payment_failure": strict}) == []
    assert run({"other_rule": strict}) == ["firing"]
