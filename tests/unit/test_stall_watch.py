"""StallWatch judges a producer stalled only when it truly delivers nothing (no Kafka)."""

from __future__ import annotations

from typing import Any

from touchpoint.producer import StallWatch


class _Producer:
    """len() = messages whose delivery report is not served yet; poll() serves them."""

    def __init__(self, watch: StallWatch, held: int, delivers_on_poll: bool) -> None:
        self.watch = watch
        self.held = held
        self.delivers_on_poll = delivers_on_poll
        self.polls = 0

    def __len__(self) -> int:
        return self.held

    def poll(self, _timeout: float) -> int:
        self.polls += 1
        if self.delivers_on_poll and self.held:
            served, self.held = self.held, 0
            self.watch.progress()  # what the delivery callback does
            return served
        return 0

    def list_topics(self, timeout: float) -> Any:
        return object()  # the broker answers


def _aged(after_s: float = 15.0) -> StallWatch:
    watch = StallWatch(after_s)
    watch.last_progress -= after_s + 1  # nothing seen for longer than after_s
    return watch


def test_delivery_reports_waiting_to_be_served_are_not_a_stall() -> None:
    """The owner did not poll for a while (a rebalance): the reports are queued."""
    watch = _aged()
    producer = _Producer(watch, held=10, delivers_on_poll=True)
    assert not watch.stalled(producer)  # type: ignore[arg-type]
    assert producer.polls == 1 and producer.held == 0


def test_a_producer_that_delivers_nothing_while_the_broker_answers_is_stalled() -> None:
    watch = _aged()
    producer = _Producer(watch, held=10, delivers_on_poll=False)
    assert watch.stalled(producer)  # type: ignore[arg-type]
    assert not watch.stalled(producer)  # type: ignore[arg-type]  # next verdict after after_s


def test_a_young_silence_or_an_empty_producer_is_not_a_stall() -> None:
    watch = StallWatch(15.0)
    assert not watch.stalled(_Producer(watch, held=10, delivers_on_poll=False))  # type: ignore[arg-type]
    aged = _aged()
    assert not aged.stalled(_Producer(aged, held=0, delivers_on_poll=False))  # type: ignore[arg-type]
