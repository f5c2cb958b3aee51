"""RecoveryWatch: when a stalled Faust changelog recovery is nudged, and when the worker gives up."""

from __future__ import annotations

from streams.watchdog import RecoveryWatch


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_a_recovery_that_reads_is_left_alone() -> None:
    clock = Clock()
    watch = RecoveryWatch(30, clock=clock)
    for left in range(100, 0, -5):
        assert watch.check({"cl-0": left, "cl-1": 7}) is None
        clock.t += 20  # slow, but "cl-0" moves every time
    assert watch.check(None) is None


def test_a_stalled_recovery_is_nudged_once_then_the_worker_exits() -> None:
    clock = Clock()
    watch = RecoveryWatch(30, clock=clock)
    stuck = {"cl-1": 13, "cl-0": 15, "cl-2": 0}
    assert watch.check(stuck) is None
    clock.t += 29
    assert watch.check(stuck) is None
    clock.t += 1
    assert watch.check(stuck) == ("nudge", ["cl-0", "cl-1"])  # not "cl-2": read to the end
    clock.t += 29
    assert watch.check(stuck) is None  # the nudge gets its own stall_s
    clock.t += 1
    assert watch.check(stuck) == ("exit", ["cl-0", "cl-1"])


def test_progress_after_a_nudge_starts_over() -> None:
    clock = Clock()
    watch = RecoveryWatch(30, clock=clock)
    watch.check({"cl-0": 15})
    clock.t += 30
    assert watch.check({"cl-0": 15}) == ("nudge", ["cl-0"])
    clock.t += 5
    assert watch.check({"cl-0": 9}) is None  # the nudge helped
    clock.t += 30
    assert watch.check({"cl-0": 9}) == ("nudge", ["cl-0"])  # a new stall: nudged again first


def test_a_finished_recovery_or_a_zero_setting_resets() -> None:
    clock = Clock()
    watch = RecoveryWatch(30, clock=clock)
    watch.check({"cl-0": 15})
    clock.t += 60
    assert watch.check({"cl-0": 0}) is None  # done
    clock.t += 60
    assert watch.check({"cl-0": 15}) is None  # the next recovery gets its full stall_s
    off = RecoveryWatch(0, clock=clock)
    off.check({"cl-0": 15})
    clock.t += 3600
    assert off.check({"cl-0": 15}) is None


def test_the_faust_attributes_the_worker_reads_exist() -> None:
    """watch_recovery (streams/app.py) reads these of faust-streaming's recovery and consumer."""
    from faust.tables.recovery import Recovery
    from faust.transport.consumer import Consumer

    for name in ("active_remaining", "in_recovery", "__init__"):
        assert hasattr(Recovery, name)
    init = Recovery.__init__.__code__
    assert {"active_offsets", "active_highwaters"} <= set(init.co_names)
    for name in ("seek_wait", "resume_partitions", "assignment"):
        assert hasattr(Consumer, name)


def test_the_worker_setting_re_seeks_three_times_before_it_exits() -> None:
    clock = Clock()
    watch = RecoveryWatch(15, nudges=3, clock=clock)
    stuck = {"cl-0": 11}
    watch.check(stuck)
    actions = []
    for _ in range(4):
        clock.t += 15
        verdict = watch.check(stuck)
        assert verdict is not None
        actions.append(verdict[0])
    assert actions == ["nudge", "nudge", "nudge", "exit"]  # 60 s without progress
