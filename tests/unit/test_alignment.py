"""Event-time alignment of input partitions."""

from __future__ import annotations

from streams.core.alignment import Aligner

SKEW = 30_000


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def events(tp: str, *times: int) -> list[tuple[int, int, int, str]]:
    return [(ts, i, 0, f"{tp}@{ts}") for i, ts in enumerate(times)]


def released(a: Aligner) -> list[str]:
    return [item for _ts, _offset, _target, item in a.release()]


def test_a_partition_running_ahead_is_held_until_the_others_catch_up() -> None:
    a = Aligner(SKEW, max_wait_s=5, clock=Clock())
    a.assigned(["web", "app"])
    a.read("web", 1_100_000, events("web", 1_000_000, 1_050_000, 1_100_000))
    assert released(a) == []  # app has not delivered anything yet
    a.read("app", 1_020_000, events("app", 1_000_000, 1_020_000))
    # Released in event-time order across partitions.
    assert released(a) == ["web@1000000", "app@1000000", "app@1020000", "web@1050000"]
    assert a.first_held_offset("web") == 2 and a.held_count("web") == 1
    a.read("app", 1_080_000, events("app", 1_080_000))
    assert released(a) == ["app@1080000", "web@1100000"]
    assert a.first_held_offset("web") is None


def test_partitions_at_their_end_or_silent_do_not_hold_anyone_back() -> None:
    clock = Clock()
    a = Aligner(SKEW, max_wait_s=5, clock=clock)
    a.assigned(["web", "app", "store"])
    a.reached_end("store")  # an empty topic
    a.read("web", 1_000_000, events("web", 1_000_000))
    a.read("app", 1_000_000, events("app", 1_000_000))
    assert len(released(a)) == 2
    a.read("web", 2_000_000, events("web", 2_000_000))
    assert released(a) == []  # app may still have older events
    a.reached_end("app")
    assert released(a) == ["web@2000000"]
    a.read("app", 1_000_100, events("app", 1_000_100))
    a.read("web", 3_000_000, events("web", 3_000_000))
    assert released(a) == ["app@1000100"]
    clock.t = 10  # app delivers nothing for longer than max_wait_s
    assert released(a) == ["web@3000000"]


def test_revoked_partitions_drop_their_held_events() -> None:
    a = Aligner(SKEW, max_wait_s=5, clock=Clock())
    a.assigned(["web", "app"])
    a.read("web", 5_000_000, events("web", 5_000_000))
    a.read("app", 1_000_000, events("app", 1_000_000))
    assert released(a) == ["app@1000000"]
    a.revoked(["web"])
    assert a.held_count("web") == 0 and released(a) == []


def test_zero_skew_disables_alignment() -> None:
    a = Aligner(0, max_wait_s=5, clock=Clock())
    a.assigned(["web", "app"])
    a.read("web", 10**12, events("web", 10**12))
    assert released(a) == ["web@1000000000000"]


def test_a_partition_with_unread_data_is_waited_for_longer_but_not_forever() -> None:
    clock = Clock()
    a = Aligner(SKEW, max_wait_s=5, clock=clock, max_backlog_wait_s=60)
    a.assigned(["web", "app"])
    a.read("web", 1_000_000, events("web", 1_000_000))
    a.read("app", 1_000_000, events("app", 1_000_000))
    assert len(released(a)) == 2
    a.read("web", 2_000_000, events("web", 2_000_000))
    a.has_backlog("app")  # app's next offset is below its high watermark
    clock.t = 30  # no fetch of app for longer than max_wait_s, but it has older events
    assert released(a) == []
    a.read("app", 1_010_000, events("app", 1_010_000))
    assert released(a) == ["app@1010000"]
    clock.t = 100  # app still has a backlog but delivered nothing for > 60 s: stop waiting
    assert released(a) == ["web@2000000"]
