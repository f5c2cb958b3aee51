"""Compile event JSON Schemas into msgspec types: the hot-path decoder.

The JSON Schema files are the contract; this module turns each one into a
msgspec Struct so that decoding *is* validation (~0.5 us per event instead of
tens of microseconds for a generic validator). Only the subset of JSON Schema
our event schemas use is supported, and anything outside it raises
:class:`SchemaError` at start-up, so a schema can never carry a rule the fast
path silently ignores. ``tests/unit/test_schema_lockstep.py`` feeds both this
decoder and a reference JSON Schema validator the same inputs and requires the
same verdicts.

Supported:
- ``type``: string, integer, number, boolean, object (with ``properties``,
  ``required``, ``additionalProperties: false``), array (``items``,
  ``minItems``, ``maxItems``);
- ``const``/``enum`` of strings; ``minLength``/``maxLength``/``pattern``;
  ``minimum``/``maximum``;
- ``oneOf`` of scalar alternatives (e.g. string or integer), or of objects
  that share a ``const`` discriminator property (a tagged union);
- ``format: date-time`` on a top-level string property with the pattern
  :data:`RFC3339_PATTERN`: checked and parsed by the decoder;
- at the top level, ``anyOf`` of ``required`` lists (e.g. customer_id or
  anonymous_id), checked after decoding.

Known difference, by choice: JSON Schema counts ``1.0`` as an integer; the
fast path (and the reference validator in the lockstep test) do not.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union

import msgspec
from msgspec import UNSET, Meta, UnsetType

from touchpoint.errors import SchemaError

# The one date-time form events may use: RFC 3339 with upper-case T and Z, an
# offset with a colon and at most 9 fraction digits. schemas.decoder.parse_rfc3339
# checks exactly this plus the calendar checks of ``format: date-time``.
RFC3339_PATTERN = "^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}([.][0-9]{1,9})?(Z|[+-][0-9]{2}:[0-9]{2})$"


def python_pattern(pattern: str) -> str:
    r"""A JSON Schema pattern (ECMA-262) for Python's ``re``: ``$`` ends the input.

    In Python ``$`` also matches before a trailing newline, so ``"USD\n"``
    would pass ``^[A-Z]{3}$``; in JSON Schema it does not. Each ``$`` outside
    a character class and not escaped becomes ``\Z``. The reference
    validator of the tests (tests/reference.py) uses the same translation.
    """
    out: list[str] = []
    i, in_class = 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i : i + 2])
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "$":
            c = "\\Z"
        out.append(c)
        i += 1
    return "".join(out)


_ANNOTATIONS = {"description", "title", "examples", "$comment"}
_TOP_ONLY = {"$schema", "$id", "self", "anyOf"}
_ALLOWED = _ANNOTATIONS | {
    "type",
    "const",
    "enum",
    "format",
    "minLength",
    "maxLength",
    "pattern",
    "minimum",
    "maximum",
    "properties",
    "required",
    "additionalProperties",
    "oneOf",
    "items",
    "minItems",
    "maxItems",
}


@dataclass(frozen=True)
class CompiledEvent:
    """One event schema compiled: its Struct type and the checks run after decoding."""

    uri: str
    struct: type[msgspec.Struct]
    # anyOf of required lists: the event must have every field of at least one group.
    any_of_required: tuple[tuple[str, ...], ...]
    # Top-level string fields with ``format: date-time`` (parsed by the decoder).
    datetime_fields: tuple[str, ...]


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]", name) if part)


class _Compiler:
    def __init__(self, uri: str) -> None:
        self.uri = uri
        self.datetime_fields: list[str] = []

    def fail(self, where: str, message: str) -> SchemaError:
        return SchemaError(self.uri, f"{where}: {message}")

    def check_keys(self, node: dict[str, Any], where: str, top: bool = False) -> None:
        allowed = _ALLOWED | _TOP_ONLY if top else _ALLOWED
        unknown = set(node) - allowed
        if unknown:
            raise self.fail(where, f"unsupported keyword(s) {sorted(unknown)}")

    def type_of(self, node: dict[str, Any], where: str, top_field: str | None = None) -> Any:
        self.check_keys(node, where)
        if "const" in node:
            if not isinstance(node["const"], str):
                raise self.fail(where, "only string consts are supported")
            return Literal[node["const"]]
        if "enum" in node:
            values = node["enum"]
            if not values or not all(isinstance(v, str) for v in values):
                raise self.fail(where, "only non-empty string enums are supported")
            return Literal[tuple(values)]
        if "oneOf" in node:
            return self.one_of(node["oneOf"], where, top_field)
        kind = node.get("type")
        if kind == "string":
            return self.string(node, where, top_field)
        if kind in ("integer", "number"):
            meta = {}
            if "minimum" in node:
                meta["ge"] = node["minimum"]
            if "maximum" in node:
                meta["le"] = node["maximum"]
            base = int if kind == "integer" else float
            return Annotated[base, Meta(**meta)] if meta else base
        if kind == "boolean":
            return bool
        if kind == "object":
            return self.struct(node, _camel(where), where)
        if kind == "array":
            if "items" not in node:
                raise self.fail(where, "arrays need 'items'")
            item = self.type_of(node["items"], f"{where}[]")
            meta = {}
            if "minItems" in node:
                meta["min_length"] = node["minItems"]
            if "maxItems" in node:
                meta["max_length"] = node["maxItems"]
            return Annotated[list[item], Meta(**meta)] if meta else list[item]  # type: ignore[valid-type]
        raise self.fail(where, f"unsupported or missing type {kind!r}")

    def string(self, node: dict[str, Any], where: str, top_field: str | None) -> Any:
        meta: dict[str, Any] = {}
        if "minLength" in node:
            meta["min_length"] = node["minLength"]
        if "maxLength" in node:
            meta["max_length"] = node["maxLength"]
        if "pattern" in node:
            meta["pattern"] = python_pattern(node["pattern"])
        fmt = node.get("format")
        if fmt is not None:
            if fmt != "date-time" or top_field is None:
                raise self.fail(where, f"format {fmt!r} is only supported as a top-level date-time")
            if node.get("pattern") != RFC3339_PATTERN:
                raise self.fail(where, f"a date-time must use the pattern {RFC3339_PATTERN!r}")
            # The decoder matches it once, fully, and parses the value (measured:
            # ~1 us cheaper than msgspec's per-field pattern constraint).
            del meta["pattern"]
            self.datetime_fields.append(top_field)
        return Annotated[str, Meta(**meta)] if meta else str

    def one_of(self, alternatives: list[Any], where: str, top_field: str | None) -> Any:
        if not alternatives:
            raise self.fail(where, "empty oneOf")
        if all(alt.get("type") == "object" for alt in alternatives):
            return self.tagged_union(alternatives, where)
        kinds = [alt.get("type") for alt in alternatives]
        if "object" in kinds or len(set(kinds)) != len(kinds):
            raise self.fail(where, "oneOf must be distinct scalar types or tagged objects")
        types = tuple(
            self.type_of(alt, f"{where}|{i}", top_field) for i, alt in enumerate(alternatives)
        )
        return Union[types]  # noqa: UP007 - a runtime-built union

    def tagged_union(self, alternatives: list[dict[str, Any]], where: str) -> Any:
        tag_fields = None
        for alt in alternatives:
            consts = {
                name
                for name, prop in alt.get("properties", {}).items()
                if "const" in prop and name in alt.get("required", ())
            }
            tag_fields = consts if tag_fields is None else tag_fields & consts
        if not tag_fields:
            raise self.fail(where, "oneOf objects need a shared required const property")
        tag_field = sorted(tag_fields)[0]
        members = []
        for alt in alternatives:
            tag = alt["properties"][tag_field]["const"]
            members.append(
                self.struct(
                    alt, f"{_camel(where)}{_camel(tag)}", where, tag_field=tag_field, tag=tag
                )
            )
        return Union[tuple(members)]  # noqa: UP007

    def struct(
        self,
        node: dict[str, Any],
        name: str,
        where: str,
        *,
        top: bool = False,
        tag_field: str | None = None,
        tag: str | None = None,
    ) -> type[msgspec.Struct]:
        self.check_keys(node, where, top=top)
        if node.get("additionalProperties") is not False:
            raise self.fail(where, "objects must set additionalProperties: false")
        props: dict[str, Any] = node.get("properties", {})
        required = set(node.get("required", ()))
        missing = required - set(props)
        if missing:
            raise self.fail(where, f"required but not defined: {sorted(missing)}")
        fields: list[tuple[str, Any] | tuple[str, Any, Any]] = []
        for field_name, prop in props.items():
            if field_name == tag_field:
                continue
            ftype = self.type_of(prop, f"{where}.{field_name}", field_name if top else None)
            if field_name in required:
                fields.append((field_name, ftype))
            else:
                # UNSET, not None: an explicit null is a type error, as in the schema.
                fields.append((field_name, Union[ftype, UnsetType], UNSET))  # noqa: UP007
        # gc=False: decoded events hold only strings, numbers and nested Structs, so
        # they cannot form cycles; untracked instances make decoding much cheaper.
        options: dict[str, Any] = {"forbid_unknown_fields": True, "kw_only": True, "gc": False}
        if tag_field is not None:
            options.update(tag_field=tag_field, tag=tag)
        return msgspec.defstruct(name, fields, **options)


def compile_event(doc: dict[str, Any]) -> CompiledEvent:
    """Compile one event schema document into a tagged msgspec Struct."""
    uri = doc.get("$id", "<schema>")
    compiler = _Compiler(uri)
    if doc.get("type") != "object":
        raise compiler.fail("$", "an event schema must describe an object")
    schema_prop = doc.get("properties", {}).get("schema", {})
    if schema_prop.get("const") != uri:
        raise compiler.fail("$.schema", "must be a const equal to the schema's $id")
    struct = compiler.struct(
        doc, _camel(uri.split("/")[1]) + "Event", "$", top=True, tag_field="schema", tag=uri
    )
    any_of = []
    for group in doc.get("anyOf", ()):
        if set(group) != {"required"}:
            raise compiler.fail("$.anyOf", "only anyOf of 'required' lists is supported")
        any_of.append(tuple(group["required"]))
    return CompiledEvent(
        uri=uri,
        struct=struct,
        any_of_required=tuple(any_of),
        datetime_fields=tuple(compiler.datetime_fields),
    )
