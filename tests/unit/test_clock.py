"""Stream time: event time first, the wall clock only for quiet live partitions."""

from __future__ import annotations

from streams.core.clock import StreamClock, iso_ms


class Wall:
    def __init__(self, t: float) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


NOW = 1_793_607_300.0


def test_a_live_quiet_partition_follows_the_wall_clock_after_idle() -> None:
    wall = Wall(NOW)
    clock = StreamClock(idle_ms=5_000, wall=wall)
    clock.observe(int(NOW * 1000) - 200)  # live: arrived 0.2 s after it happened
    assert clock.now() == int(NOW * 1000) - 200
    wall.t += 4
    assert clock.now() == int(NOW * 1000) - 200  # within idle
    wall.t += 6
    assert clock.now() == int(NOW * 1000) - 200 + 5_000  # 10 s quiet, minus 5 s idle


def test_replayed_history_never_follows_the_wall_clock() -> None:
    wall = Wall(NOW)
    clock = StreamClock(idle_ms=5_000, wall=wall)
    history = int(NOW * 1000) - 86_400_000  # yesterday
    clock.observe(history)
    wall.t += 3600
    assert clock.now() == history


def test_a_partition_with_unread_input_is_behind_not_idle() -> None:
    wall = Wall(NOW)
    clock = StreamClock(idle_ms=5_000, wall=wall)
    clock.observe(int(NOW * 1000))
    clock.behind = True
    wall.t += 60
    assert clock.now() == int(NOW * 1000)
    clock.behind = False
    assert clock.now() == int(NOW * 1000) + 55_000


def test_the_clock_never_goes_backwards() -> None:
    wall = Wall(NOW)
    clock = StreamClock(idle_ms=0, wall=wall)
    clock.observe(int(NOW * 1000))
    wall.t += 100
    advanced = clock.now()
    clock.observe(int(NOW * 1000) + 1_000)  # a fresh event, older than the advanced time
    assert clock.now() == advanced


def test_iso_ms() -> None:
    assert iso_ms(1_793_607_300_120) == "2026-11-02T08:15:00.120Z"
