"""Dead-letter records: the original bytes, where they came from, and why they were refused."""

from __future__ import annotations

import base64
import hashlib
from typing import Any

from schemas.decoder import Rejection
from schemas.registry import uri_for
from streams.core.clock import iso_ms
from touchpoint import jsonio

DEAD_LETTER_SCHEMA = uri_for("dead_letter")


def dead_letter(
    rejection: Rejection,
    *,
    payload: bytes,
    topic: str,
    partition: int = -1,
    offset: int = -1,
    timestamp_ms: int = -1,
    key: bytes | None = None,
    stage: str = "ingest",
    max_payload_bytes: int = 65_536,
    now_ms: int,
) -> dict[str, Any]:
    """Build a ``dead_letter`` record (schema ``iglu:com.touchpoint/dead_letter/jsonschema/1-0-0``).

    Payloads larger than ``max_payload_bytes`` keep a prefix, their full size and
    SHA-256; the raw topic (``source``) still holds the whole message.
    """
    truncated = len(payload) > max_payload_bytes
    kept = payload[:max_payload_bytes] if truncated else payload
    source: dict[str, Any] = {
        "topic": topic,
        "partition": partition,
        "offset": offset,
        "timestamp_ms": timestamp_ms,
    }
    if key is not None:
        source["key_b64"] = base64.b64encode(key[:1024]).decode("ascii")
    record: dict[str, Any] = {
        "schema": DEAD_LETTER_SCHEMA,
        "reason": rejection.reason,
        "detail": rejection.detail[:1024],
        "stage": stage,
        "source": source,
        "payload_b64": base64.b64encode(kept).decode("ascii"),
        "payload_size": len(payload),
        "payload_truncated": truncated,
        "payload_sha256": hashlib.sha256(payload).hexdigest(),
        "received_at": iso_ms(now_ms),
    }
    if rejection.path:
        record["path"] = rejection.path[:256]
    return record


def encode(record: dict[str, Any]) -> bytes:
    return jsonio.dumps(record)


def original_payload(record: dict[str, Any]) -> bytes:
    """The bytes a dead letter kept (the whole payload unless ``payload_truncated``)."""
    return base64.b64decode(record["payload_b64"])
