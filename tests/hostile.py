"""The hostile-input corpus: committed files (tests/corpus/hostile) plus generated cases.

Each :class:`Case` is one raw Kafka message value (``None``: a tombstone) and
what ingest must do with it: a dead-letter ``reason``, or ``None`` when the
input is odd but valid and must be accepted. The files and their expected
reasons are listed in ``manifest.json``. Cases that depend on the ingest
limits or on the clock are generated here, so no megabytes are committed.
"""

from __future__ import annotations

import base64
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from schemas.decoder import REASONS
from sinks.deadletter import original_payload
from tests.reference import assert_valid_record
from touchpoint.config import IngestSettings

CORPUS = Path(__file__).parent / "corpus" / "hostile"
MANIFEST = json.loads((CORPUS / "manifest.json").read_text(encoding="utf-8"))
PAGE_VIEW = "iglu:com.touchpoint/page_view/jsonschema/1-0-0"


@dataclass(frozen=True)
class Case:
    name: str
    value: bytes | None
    reason: str | None  # None: must be accepted


def event(
    event_id: str, occurred_at: int | str = "2026-11-02T08:15:00.120Z", **extra: object
) -> bytes:
    doc = {
        "schema": PAGE_VIEW,
        "event_id": event_id,
        "event_type": "page_view",
        "channel": "web",
        "occurred_at": occurred_at,
        "customer_id": "cust-hostile",
        "properties": {"url": "/products/1"},
        **extra,
    }
    return json.dumps(doc).encode()


def file_cases() -> list[Case]:
    cases = [
        Case(name, (CORPUS / name).read_bytes(), reason)
        for name, reason in MANIFEST["rejected"].items()
    ]
    cases += [Case(name, (CORPUS / name).read_bytes(), None) for name in MANIFEST["accepted"]]
    return cases


def generated_cases(settings: IngestSettings, now_ms: int) -> list[Case]:
    """Cases sized from ``settings`` (payload limit, future skew) and the clock ``now_ms``."""
    limit = settings.max_payload_bytes
    skew_ms = settings.max_future_skew_s * 1000

    def padded(size: int) -> bytes:
        # A well-formed event whose url is padded to ``size`` bytes in total.
        base = event("ev-huge", properties={"url": ""})
        return base.replace(b'"url": ""', b'"url": "' + b"u" * (size - len(base)) + b'"')

    return [
        Case("generated.tombstone", None, "empty_payload"),
        Case("generated.empty", b"", "empty_payload"),
        Case("generated.one_byte_over_the_limit", padded(limit + 1), "payload_too_large"),
        # Bigger than the dead-letter payload limit too: the dead letter keeps a prefix.
        Case("generated.900_kib", padded(900 * 1024), "payload_too_large"),
        Case("generated.100k_nested_arrays", b"[" * 100_000 + b"]" * 100_000, "payload_too_large"),
        # Deep nesting that fits the limit reaches the parser.
        Case(
            "generated.deep_arrays_in_schema",
            b'{"schema":' + b"[" * (limit // 2 - 8) + b"]" * (limit // 2 - 8) + b"}",
            "too_deeply_nested",
        ),
        Case(
            "generated.deep_objects",
            b'{"a":' * ((limit - 1) // 6) + b"1" + b"}" * ((limit - 1) // 6),
            "too_deeply_nested",
        ),
        Case(
            "generated.deep_unclosed",
            b'{"schema":' + b"[" * (limit - 20),
            "too_deeply_nested",
        ),
        Case(
            "generated.deep_top_level_array",
            b"[" * (limit // 2) + b"]" * (limit // 2),
            "not_an_object",
        ),
        Case(
            "generated.beyond_max_future_skew",
            event("ev-future", now_ms + skew_ms + 3_600_000),
            "timestamp_out_of_range",
        ),
        Case(
            "generated.far_future_rfc3339",
            event("ev-far-future", "2999-01-01T00:00:00Z"),
            "timestamp_out_of_range",
        ),
        # The same event twice: ingest is stateless and forwards both (at-least-once);
        # the journey stage drops the second copy by event_id.
        Case("generated.duplicate_event_id.1", event("ev-duplicate", now_ms - 60_000), None),
        Case("generated.duplicate_event_id.2", event("ev-duplicate", now_ms - 60_000), None),
    ]


def all_cases(settings: IngestSettings, now_ms: int) -> list[Case]:
    return file_cases() + generated_cases(settings, now_ms)


def check_dead_letter(
    doc: dict[str, Any],
    case: Case,
    *,
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    payload_limit: int,
) -> None:
    """Assert one dead-letter record is right for ``case`` read at topic/partition/offset."""
    assert_valid_record(doc)
    assert doc["reason"] == case.reason, (case.name, doc["reason"], doc["detail"])
    assert doc["reason"] in REASONS and doc["detail"]
    assert doc["stage"] == "ingest"
    source = doc["source"]
    assert (source["topic"], source["partition"], source["offset"]) == (topic, partition, offset)
    if key is None:
        assert "key_b64" not in source
    else:
        assert base64.b64decode(source["key_b64"]) == key[:1024]
    value = case.value or b""
    kept = original_payload(doc)
    assert doc["payload_size"] == len(value)
    assert doc["payload_sha256"] == hashlib.sha256(value).hexdigest()
    # Documented truncation: past the dead-letter limit only a prefix is kept
    # (the raw topic still holds the whole message).
    assert doc["payload_truncated"] == (len(value) > payload_limit)
    assert kept == value[:payload_limit]
