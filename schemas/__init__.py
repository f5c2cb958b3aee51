"""The event contract: versioned, self-describing JSON Schemas and the fast decoder built from them."""

from schemas.decoder import REASONS, EventDecoder, Rejection
from schemas.registry import SCHEMA_ROOT, SchemaKey, load_all, uri_for

__all__ = [
    "REASONS",
    "SCHEMA_ROOT",
    "EventDecoder",
    "Rejection",
    "SchemaKey",
    "load_all",
    "uri_for",
]
