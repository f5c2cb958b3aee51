"""Reference validation with a standard JSON Schema library, for tests.

The fast decoder must agree with this on every input (see test_schema_lockstep).
Two deliberate differences from stock JSON Schema and Python's json are
configured here and in the decoder alike: ``1.0`` is not an integer, and a
string holding a lone surrogate (``"\\ud800"``) is not text (it has no UTF-8
form; I-JSON, RFC 7493, forbids it; Python's json accepts it).

One library behaviour is corrected towards the standard: jsonschema runs
``pattern`` (and rfc3339-validator the date-time format) with Python's
``re``, where ``$`` also matches before a trailing newline; in JSON Schema
(ECMA-262) it does not, so ``"2026-01-01T00:00:00Z\\n"`` is no date-time.
Patterns are translated with :func:`schemas.compiler.python_pattern`, as the
decoder's are.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from functools import cache
from typing import Any

import jsonschema
from jsonschema import Draft202012Validator, FormatChecker, ValidationError

from schemas.compiler import python_pattern
from schemas.registry import load_all


def _is_integer(checker: Any, instance: Any) -> bool:
    return isinstance(instance, int) and not isinstance(instance, bool)


@cache
def _compiled(pattern: str) -> re.Pattern[str]:
    return re.compile(python_pattern(pattern))


def _pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _compiled(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


_TYPES = Draft202012Validator.TYPE_CHECKER.redefine("integer", _is_integer)
StrictValidator = jsonschema.validators.extend(
    Draft202012Validator, validators={"pattern": _pattern}, type_checker=_TYPES
)


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
