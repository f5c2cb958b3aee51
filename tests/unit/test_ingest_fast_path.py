"""Ingest's inlined fast path gives exactly the decoder's verdicts and event times.

:meth:`streams.ingest.Ingestor.process` accepts the common case without calling
:meth:`EventDecoder.decode`; it must accept precisely what the decoder accepts
(with the same event time and key) and dead-letter everything else with the
decoder's reason.
"""

from __future__ import annotations

import json
from typing import Any

import confluent_kafka
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas.decoder import EventDecoder, Rejection
from streams.bundles import Partitioner
from streams.ingest import Ingestor
from tests.strategies import VALID_EVENTS, mutated_events
from tests.unit.test_schema_lockstep import BASE, CORPUS, with_
from touchpoint import jsonio

NOW_S = 1_795_000_000.0
DECODER = EventDecoder(max_payload_bytes=4096, max_future_skew_s=300, clock=lambda: NOW_S)


def message(value: bytes, offset: int = 0) -> Any:
    return confluent_kafka.Message(topic="tp.web", partition=0, offset=offset, value=value)


def verdicts(values: list[bytes]) -> tuple[list[Any], list[Any]]:
    """(what the decoder says, what ingest did) for each input, in order."""
    ingestor = Ingestor(DECODER, Partitioner(4), {"tp.web": "web"})
    result = ingestor.process([message(v, i) for i, v in enumerate(values)], 0)
    accepted = {
        offset: (item[1], item[2])
        for entries in result.entries.values()
        for _ts, offset, _target, item in entries
        if isinstance(item, tuple)
    }
    dead = iter(jsonio.loads(value) for _key, value in result.dead)
    expected, actual = [], []
    for offset, value in enumerate(values):
        verdict = DECODER.validate(value)
        if isinstance(verdict, Rejection):
            expected.append(verdict.reason)
            actual.append(None if offset in accepted else next(dead)["reason"])
        else:
            event, ts = verdict
            key = event.customer_id if isinstance(event.customer_id, str) else event.anonymous_id
            expected.append((ts, key))
            actual.append(accepted.get(offset))
    return expected, actual


def test_corpus_and_edge_times_agree() -> None:
    near = int(NOW_S * 1000)
    values = [
        *CORPUS,
        with_(occurred_at=near),
        with_(occurred_at=near + 300_000),
        with_(occurred_at=near + 300_001),
        with_(occurred_at=946_684_799_999),
        with_(occurred_at="2026-11-09T08:53:20Z"),
        with_(occurred_at="2026-11-09T08:53:20.5+01:00"),
        with_(occurred_at="2026-11-09T08:53:20.5+24:00"),
        with_(occurred_at="1999-12-31T23:59:59Z"),
        with_(customer_id=..., anonymous_id="a-1"),
        with_(customer_id=...),
        json.dumps({**BASE, "properties": {"url": "/" * 5000}}).encode(),
    ]
    # Twice: the second pass runs on the warm date-time caches.
    for _ in range(2):
        expected, actual = verdicts(values)
        assert actual == expected


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(VALID_EVENTS | mutated_events(), min_size=1, max_size=20))
def test_generated_events_agree(events: list[Any]) -> None:
    values = [json.dumps(e).encode() for e in events]
    expected, actual = verdicts(values)
    assert actual == expected
