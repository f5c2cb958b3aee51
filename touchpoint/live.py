"""Publishing simulated traffic in real time (event time follows the wall clock)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from touchpoint.producer import TouchpointProducer
from touchpoint.simulator import Simulator, event_time_ms

# Malformed inputs a live demo sprinkles in, so the dead-letter path is visible.
BAD_SAMPLES = (
    b'{"event_type": "page_view", "channel": "web"',
    b'{"schema": "iglu:com.touchpoint/page_view/jsonschema/1-0-0", "event_id": 17}',
    b'{"schema": "iglu:com.touchpoint/teleport/jsonschema/1-0-0", "event_id": "x"}',
    b"\xff\xfe not utf-8",
    b"[]",
)


def publish_live(
    sim: Simulator,
    producer: TouchpointProducer,
    *,
    end_ms: int | None = None,
    count: int | None = None,
    stop: threading.Event | None = None,
    bad_every: int = 0,
    clock: Callable[[], float] = time.time,
    on_event: Callable[[str, dict], None] | None = None,
) -> int:
    """Send ``sim``'s events as their event time comes due; returns how many were sent."""
    sent = 0
    for source, event in sim.events():
        if (stop is not None and stop.is_set()) or (count is not None and sent >= count):
            break
        due = event_time_ms(event)
        if end_ms is not None and due >= end_ms:
            break
        wait = due / 1000 - clock()
        while wait > 0:
            if stop is not None and stop.wait(min(wait, 0.1)):
                return sent
            if stop is None:
                time.sleep(min(wait, 0.1))
            wait = due / 1000 - clock()
        producer.send(event, source)
        sent += 1
        if on_event is not None:
            on_event(source, event)
        if bad_every and sent % bad_every == 0:
            sample = BAD_SAMPLES[(sent // bad_every) % len(BAD_SAMPLES)]
            producer.send_raw(producer.topic_for(source), sample)
    return sent
