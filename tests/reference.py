"""Reference validation with a standard JSON Schema library, for tests.

The fast decoder must agree with this on every input (see test_schema_lockstep).
Two deliberate differences from stock JSON Schema and Python's json are
configured here and in the decoder alike: ``1.0`` is not an integer, and a
string holding a lone surrogate (``"\\ud800"``) is not text (it has no UTF-8
form; I-JSON, RFC 7493, forbids it; Python's json accepts it).
"""

from __future__ import annotations

import json
from functools import cache
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator, FormatChecker

from schemas.registry import load_all


def _is_integer(checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


_TYPES = Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer)
StrictValidator = jsonschema.validators.extend(Draft202012Validator, type_checker=_TYPES)


@cache
def validator(uri: str) -> Any:
    return StrictValidator(load_all()[uri], format_checker=FormatChecker())


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def reference_verdict(data: bytes) -> bool:
    """True when ``data`` is valid JSON naming a known schema and valid against it."""
    try:
        doc = json.loads(data.decode("utf-8"), parse_constant=_no_constants)
        json.dumps(doc, ensure_ascii=False).encode("utf-8")  # lone surrogates fail here
    except (UnicodeError, ValueError, RecursionError):
        return False
    if not isinstance(doc, dict) or not isinstance(doc.get("schema"), str):
        return False
    if doc["schema"] not in load_all():
        return False
    return validator(doc["schema"]).is_valid(doc)


def assert_valid_record(record: dict[str, Any]) -> None:
    """Assert an output record is valid against the schema it names."""
    validator(record["schema"]).validate(record)
