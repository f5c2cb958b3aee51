"""All JSON encoding and decoding, with fixed options, lives here.

orjson serves general records; msgspec serves the hot path where a typed
decoder validates while it parses (see :mod:`schemas.decoder`) and where
bundles of records are encoded in one call.
"""

from __future__ import annotations

from typing import Any

import msgspec
import orjson

_DUMPS_OPTS = orjson.OPT_NON_STR_KEYS
_bundle_encoder = msgspec.json.Encoder()

JSONDecodeError = orjson.JSONDecodeError


def dumps(obj: Any) -> bytes:
    """Encode ``obj`` as compact UTF-8 JSON bytes."""
    return orjson.dumps(obj, option=_DUMPS_OPTS)


def dumps_pretty(obj: Any) -> bytes:
    """Encode ``obj`` indented with sorted keys, for files humans read (schemas, dashboards)."""
    return orjson.dumps(obj, option=_DUMPS_OPTS | orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS)


def loads(data: bytes | bytearray | memoryview | str) -> Any:
    """Decode JSON (strict UTF-8; raises :class:`JSONDecodeError`)."""
    return orjson.loads(data)


def encode_fast(obj: Any) -> bytes:
    """Encode objects that may contain msgspec Structs (hot path)."""
    return _bundle_encoder.encode(obj)
