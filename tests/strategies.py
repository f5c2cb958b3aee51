"""Hypothesis strategies: valid events generated from the schema files, and near-misses."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

from hypothesis import strategies as st

from schemas.registry import event_schemas

JSON_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20)
)
ANY_JSON = st.recursive(
    JSON_SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def rfc3339(draw: st.DrawFn) -> str:
    moment = draw(
        st.datetimes(min_value=datetime(2001, 1, 1), max_value=datetime(2099, 12, 31))  # noqa: DTZ001
    )
    minutes = draw(st.integers(min_value=-23 * 60 - 59, max_value=23 * 60 + 59))
    zone = draw(st.sampled_from(["Z", "offset"]))
    text = moment.strftime("%Y-%m-%dT%H:%M:%S")
    digits = draw(st.integers(min_value=0, max_value=9))
    if digits:
        text += "." + "".join(
            draw(st.lists(st.sampled_from("0123456789"), min_size=digits, max_size=digits))
        )
    if zone == "Z":
        return text + "Z"
    sign = "+" if minutes >= 0 else "-"
    return text + f"{sign}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


def near_miss_datetimes() -> st.SearchStrategy[str]:
    """Strings that look like date-times and often are not valid RFC 3339."""
    parts = st.tuples(
        st.sampled_from(["2026", "0000", "9999", "1999", "226", "20260"]),
        st.sampled_from(["-", "/", ""]),
        st.sampled_from(["01", "02", "12", "13", "00", "1"]),
        st.sampled_from(["-"]),
        st.sampled_from(["01", "28", "29", "30", "31", "32", "00"]),
        st.sampled_from(["T", "t", " ", "_"]),
        st.sampled_from(["00", "23", "24", "9"]),
        st.sampled_from([":00", ":59", ":60", ""]),
        st.sampled_from([":00", ":59", ":60", ""]),
        st.sampled_from(["", ".", ".1", ".123456", ".123456789", ".1234567890", ",5"]),
        st.sampled_from(
            ["Z", "z", "", "+01:00", "+0100", "-00:00", "+24:00", "+23:59", "+01", " Z", "Z\n"]
        ),
    )
    return parts.map("".join) | st.text(alphabet="0123456789-:TZ.+ ", max_size=32)


def _from(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    if "const" in node:
        return st.just(node["const"])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "oneOf" in node:
        return st.one_of([_from(alt) for alt in node["oneOf"]])
    kind = node["type"]
    if kind == "string":
        if node.get("format") == "date-time":
            return rfc3339()
        if "pattern" in node:  # only currency codes use one
            return st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=3, max_size=3)
        return st.text(
            min_size=node.get("minLength", 0), max_size=min(node.get("maxLength", 40), 40)
        )
    if kind == "integer":
        lo = node.get("minimum", -(2**31))
        hi = node.get("maximum", 2**31)
        if lo == 0 and hi > 10**12:  # epoch ms: keep event times plausible
            lo, hi = 978_307_200_000, 4_070_908_800_000
        return st.integers(min_value=lo, max_value=hi)
    if kind == "number":
        return st.floats(
            min_value=node.get("minimum"), max_value=node.get("maximum"), allow_nan=False
        ) | st.integers(
            min_value=int(node.get("minimum", 0)), max_value=int(node.get("maximum", 100))
        )
    if kind == "boolean":
        return st.booleans()
    if kind == "object":
        required = set(node.get("required", ()))
        props = node["properties"]
        return st.fixed_dictionaries(
            {k: _from(v) for k, v in props.items() if k in required},
            optional={k: _from(v) for k, v in props.items() if k not in required},
        )
    raise NotImplementedError(kind)


def _event(doc: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    groups = [g["required"] for g in doc.get("anyOf", ())]
    base = _from({k: v for k, v in doc.items() if k in ("type", "properties", "required")})
    if not groups:
        return base
    return base.filter(lambda ev: any(all(name in ev for name in g) for g in groups))


EVENT_SCHEMAS = event_schemas()
VALID_EVENTS = st.one_of([_event(doc) for doc in EVENT_SCHEMAS.values()])


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for key, value in node.items():
            out.extend(_paths(value, (*prefix, key)))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.extend(_paths(value, (*prefix, i)))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    for step in path[:-1]:
        doc = doc[step]
    return doc


@st.composite
def mutated_events(draw: st.DrawFn) -> dict[str, Any] | Any:
    """A valid event with one random change: many become invalid, some stay valid."""
    event = draw(VALID_EVENTS)
    paths = _paths(event)
    action = draw(st.sampled_from(["drop", "replace", "add", "time", "time_int", "whole"]))
    if action == "whole":
        return draw(ANY_JSON)
    if action == "time":
        event["occurred_at"] = draw(near_miss_datetimes())
        return event
    if action == "time_int":
        event["occurred_at"] = draw(
            st.integers(min_value=-(2**64), max_value=2**64) | st.floats(allow_nan=False)
        )
        return event
    path = draw(st.sampled_from(paths))
    parent = _parent(event, path)
    if action == "drop" and isinstance(parent, dict):
        del parent[path[-1]]
    elif action == "add":
        target = parent[path[-1]] if isinstance(parent[path[-1]], dict) else parent
        if isinstance(target, dict):
            target[draw(st.text(min_size=1, max_size=12))] = draw(ANY_JSON)
    else:
        parent[path[-1]] = draw(ANY_JSON)
    return event


def epoch_ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


UTC_OFFSETS = [UTC, timezone(timedelta(hours=1)), timezone(timedelta(hours=-5, minutes=-30))]
