"""Finding and reading the schema files.

Layout follows Iglu: ``schemas/<vendor>/<name>/jsonschema/<MODEL-REVISION-ADDITION>``,
one file per event type (or output record) and version. Each file names
itself in a ``self`` block and in ``$id`` (``iglu:vendor/name/jsonschema/1-0-0``),
and events carry that URI in their ``schema`` field.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from touchpoint import jsonio
from touchpoint.errors import SchemaError

SCHEMA_ROOT = Path(__file__).resolve().parent
VENDOR = "com.touchpoint"
_URI = re.compile(
    r"^iglu:(?P<vendor>[a-z0-9_.-]+)/(?P<name>[a-z][a-z0-9_]*)/(?P<format>jsonschema)/"
    r"(?P<version>[1-9][0-9]*-[0-9]+-[0-9]+)$"
)

# Output records Touchpoint writes (everything else in schemas/ is an input event).
OUTPUT_RECORDS = ("dead_letter", "late_event", "journey_summary", "friction_signal", "alert")


@dataclass(frozen=True, order=True)
class SchemaKey:
    """Identity of one schema version: vendor, name, format and SchemaVer version."""

    vendor: str
    name: str
    format: str
    version: str

    @classmethod
    def parse(cls, uri: str) -> SchemaKey:
        match = _URI.match(uri)
        if match is None:
            raise ValueError(f"not an Iglu schema URI: {uri!r}")
        return cls(**match.groupdict())

    @property
    def uri(self) -> str:
        return f"iglu:{self.vendor}/{self.name}/{self.format}/{self.version}"

    @property
    def relpath(self) -> Path:
        return Path(self.vendor, self.name, self.format, self.version)

    @property
    def schemaver(self) -> tuple[int, int, int]:
        model, revision, addition = (int(x) for x in self.version.split("-"))
        return model, revision, addition


def uri_for(name: str, version: str = "1-0-0", vendor: str = VENDOR) -> str:
    """The Iglu URI of one of our schemas, e.g. ``uri_for("dead_letter")``."""
    return SchemaKey(vendor, name, "jsonschema", version).uri


def iter_schema_files(root: Path = SCHEMA_ROOT) -> Iterator[Path]:
    """Every schema file under ``root`` (files four levels down, Iglu layout)."""
    for path in sorted(root.glob("*/*/*/*")):
        if path.is_file() and not path.name.endswith((".py", ".pyc", ".json", ".md")):
            yield path


def read_schema(path: Path) -> dict[str, Any]:
    try:
        doc = jsonio.loads(path.read_bytes())
    except jsonio.JSONDecodeError as exc:
        raise SchemaError(str(path), f"not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise SchemaError(str(path), "a schema must be a JSON object")
    return doc


def key_of(doc: dict[str, Any], path: Path | str = "<schema>") -> SchemaKey:
    """The identity a schema document declares in its ``self`` block."""
    try:
        self_block = doc["self"]
        return SchemaKey(
            self_block["vendor"], self_block["name"], self_block["format"], self_block["version"]
        )
    except (KeyError, TypeError):
        raise SchemaError(str(path), "missing or incomplete 'self' block") from None


@cache
def load_all(root: Path = SCHEMA_ROOT) -> dict[str, dict[str, Any]]:
    """All schemas under ``root`` by URI."""
    schemas: dict[str, dict[str, Any]] = {}
    for path in iter_schema_files(root):
        doc = read_schema(path)
        schemas[key_of(doc, path).uri] = doc
    return schemas


def is_event_schema(doc: dict[str, Any]) -> bool:
    """Input events declare an ``event_type``; output records do not."""
    return "event_type" in doc.get("properties", {})


def event_schemas(root: Path = SCHEMA_ROOT) -> dict[str, dict[str, Any]]:
    """The input-event schemas by URI."""
    return {uri: doc for uri, doc in load_all(root).items() if is_event_schema(doc)}


def latest(name: str, root: Path = SCHEMA_ROOT, vendor: str = VENDOR) -> str:
    """URI of the newest version of schema ``name``."""
    keys = [
        SchemaKey.parse(uri)
        for uri in load_all(root)
        if SchemaKey.parse(uri).name == name and SchemaKey.parse(uri).vendor == vendor
    ]
    if not keys:
        raise KeyError(name)
    return max(keys, key=lambda k: k.schemaver).uri
