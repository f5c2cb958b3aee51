"""The compiler refuses JSON Schema it cannot mirror exactly."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from schemas.compiler import compile_event
from schemas.registry import load_all, uri_for
from touchpoint.errors import SchemaError


def _page_view() -> dict[str, Any]:
    return copy.deepcopy(load_all()[uri_for("page_view")])


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["properties"]["properties"].update(allOf=[{}]), "unsupported keyword"),
        (
            lambda d: d["properties"]["properties"].pop("additionalProperties"),
            "additionalProperties",
        ),
        (lambda d: d["properties"]["occurred_at"]["oneOf"][0].pop("pattern"), "pattern"),
        (lambda d: d["properties"]["event_id"].update(format="uuid"), "format"),
        (
            lambda d: d["properties"]["schema"].update(const="iglu:x/y/jsonschema/1-0-0"),
            "const equal",
        ),
        (lambda d: d["properties"]["channel"].update(enum=[1, 2]), "string enums"),
        (lambda d: d.update(anyOf=[{"not": {}}]), "anyOf"),
        (lambda d: d["properties"]["properties"]["required"].append("nope"), "not defined"),
    ],
)
def test_unsupported_schema_features_fail_at_start_up(mutate: Any, message: str) -> None:
    doc = _page_view()
    mutate(doc)
    with pytest.raises(SchemaError, match=message):
        compile_event(doc)
