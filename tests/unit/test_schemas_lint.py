"""Lint every schema file: meta-schema, identity, descriptions, examples, published versions."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from schemas.compiler import compile_event
from schemas.decoder import EventDecoder
from schemas.registry import (
    OUTPUT_RECORDS,
    SCHEMA_ROOT,
    SchemaKey,
    is_event_schema,
    iter_schema_files,
    key_of,
    read_schema,
)
from tests.reference import validator
from touchpoint import jsonio

FILES = list(iter_schema_files())
PUBLISHED = jsonio.loads((SCHEMA_ROOT / "published.json").read_bytes())


def _id(path: Path) -> str:
    return str(path.relative_to(SCHEMA_ROOT))


def test_there_are_schemas_for_the_vocabulary_and_outputs() -> None:
    names = {key_of(read_schema(p)).name for p in FILES}
    minimum = {
        "page_view", "product_view", "search", "cart_add", "cart_remove", "checkout_start",
        "payment_failed", "purchase", "app_open", "screen_view", "email_sent", "email_open",
        "email_click", "email_bounce", "unsubscribe", "store_visit", "pos_purchase",
        "support_contact", "survey_response", "identify", "error",
    }  # fmt: skip
    assert minimum | set(OUTPUT_RECORDS) <= names


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_schema_is_valid_against_the_meta_schema(path: Path) -> None:
    Draft202012Validator.check_schema(read_schema(path))


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_path_matches_the_schemas_own_identity(path: Path) -> None:
    doc = read_schema(path)
    key = key_of(doc, path)
    assert key.relpath == path.relative_to(SCHEMA_ROOT)
    assert doc["$id"] == key.uri
    assert SchemaKey.parse(key.uri) == key
    assert doc["properties"]["schema"]["const"] == key.uri


def _objects(node: Any, where: str = "$"):
    if isinstance(node, dict):
        if node.get("type") == "object" and "properties" in node:
            yield where, node
        for key, value in node.items():
            if key != "examples":
                yield from _objects(value, f"{where}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _objects(value, f"{where}[{i}]")


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_every_property_is_described_and_objects_are_closed(path: Path) -> None:
    doc = read_schema(path)
    assert doc.get("description")
    for where, obj in _objects(doc):
        assert obj.get("additionalProperties") is False, f"{where} must be closed"
        assert set(obj.get("required", ())) <= set(obj["properties"]), where
        for name, prop in obj["properties"].items():
            assert prop.get("description"), f"{where}.{name} has no description"


@pytest.mark.parametrize("path", FILES, ids=_id)
def test_shipped_examples_validate(path: Path) -> None:
    doc = read_schema(path)
    examples = doc.get("examples", [])
    assert examples, "every schema ships at least one example"
    check = validator(key_of(doc).uri)
    decoder = EventDecoder(clock=lambda: 4_000_000_000.0)
    for example in examples:
        check.validate(example)
        if is_event_schema(doc):
            assert isinstance(decoder.validate(jsonio.dumps(example)), tuple), example


@pytest.mark.parametrize("path", [p for p in FILES if is_event_schema(read_schema(p))], ids=_id)
def test_event_schemas_compile_to_the_fast_decoder(path: Path) -> None:
    compiled = compile_event(read_schema(path))
    assert compiled.uri == key_of(read_schema(path)).uri
    assert "occurred_at" in compiled.datetime_fields


def test_published_versions_are_unchanged() -> None:
    """A released schema file is never edited: add a new version instead."""
    current = {
        key_of(read_schema(p)).uri: hashlib.sha256(p.read_bytes()).hexdigest() for p in FILES
    }
    changed = sorted(uri for uri, digest in PUBLISHED.items() if current.get(uri) != digest)
    assert not changed, f"published schemas were edited or removed: {changed}"
    unlisted = sorted(set(current) - set(PUBLISHED))
    assert not unlisted, f"new schema files must be added to schemas/published.json: {unlisted}"
