"""Hand-made events for tests (valid by construction; the simulator makes realistic traffic)."""

from __future__ import annotations

from typing import Any

from schemas.registry import uri_for

BASE_MS = 1_793_607_300_000  # 2026-11-02T08:15:00Z


def event(
    event_type: str,
    event_id: str,
    *,
    customer_id: str | None = "cust-1",
    anonymous_id: str | None = None,
    channel: str = "web",
    ts: int | str = BASE_MS,
    **properties: Any,
) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schema": uri_for(event_type),
        "event_id": event_id,
        "event_type": event_type,
        "channel": channel,
        "occurred_at": ts,
        "properties": properties,
    }
    if customer_id is not None:
        doc["customer_id"] = customer_id
    if anonymous_id is not None:
        doc["anonymous_id"] = anonymous_id
    return doc


def page_view(event_id: str, url: str = "/products/1", **kw: Any) -> dict[str, Any]:
    return event("page_view", event_id, url=url, **kw)
