"""The validated stream's format: bundles of touchpoints, one bundle per message.

Faust pays ~165 us of framework work per Kafka *message* (FIELD-NOTES), so the
validated stream never carries one touchpoint per message. Ingest groups the
touchpoints of a batch by the partition their key hashes to and writes each
group as one message (a :class:`Bundle`) to exactly that partition. Every key
in a bundle therefore belongs to the partition the bundle sits on, which is
what Faust tables (changelog partition = message partition) and
``table_route`` (murmur2 of the key) both assume.

Wire format: JSON, each item an array with a tag first:
``{"v": 1, "at": <ingest ms>, "items": [["t", ts, key, stage, {event}], ["l", ...]]}``.

- ``t`` :class:`Touchpoint`: a validated event keyed by customer id (or anonymous
  id when the visitor is not identified), with its event time in epoch ms and
  its journey stage; the event object is the producer's JSON, passed through
  untouched (:func:`touchpoint_item`).
- ``l`` :class:`Link`: an ``identify`` event's control copy, sent to the
  *anonymous* id's partition so the anonymous state can be handed over to the
  customer's partition (identity stitching). It is not a touchpoint and is
  never counted as one.
- ``m`` :class:`Merge`: the anonymous history being handed over, sent by the
  journey stage to the customer's partition.
- ``f`` :class:`Forget`: an erasure request (``touchpoint forget``), processed
  in order with the key's events by the worker that owns the key.
"""

from __future__ import annotations

import ctypes
import glob
import logging
import os
from collections.abc import Callable
from typing import Any

import msgspec

log = logging.getLogger(__name__)

BUNDLE_VERSION = 1


class Event(msgspec.Struct, gc=False):
    """The validated event as the producer sent it (fields the journey stage reads).

    Ingest embeds the original JSON verbatim (it was validated against its
    schema), so nothing is re-encoded; unknown fields such as ``schema`` and
    ``occurred_at`` are skipped when decoding.
    """

    event_id: str
    event_type: str
    channel: str
    # Kept as raw JSON: most touchpoints never need their properties, and
    # parsing them all cost ~1 us per event. See :func:`properties_of`.
    properties: msgspec.Raw
    customer_id: str | None = None
    anonymous_id: str | None = None
    session_hint: str | None = None


class Touchpoint(msgspec.Struct, array_like=True, tag="t", gc=False):
    """A validated touchpoint: normalised event time (epoch ms), routing key, stage index (-1: none)."""

    ts: int
    key: str
    stage: int
    event: Event


class Link(msgspec.Struct, array_like=True, tag="l", gc=False):
    """``anonymous_id`` now belongs to ``customer_id`` (from an identify event)."""

    anonymous_id: str
    customer_id: str
    ts: int
    event_id: str


class Merge(msgspec.Struct, array_like=True, tag="m", gc=False):
    """Anonymous history handed over to ``customer_id`` (opaque to ingest)."""

    customer_id: str
    anonymous_id: str
    ts: int
    payload: Any


class Forget(msgspec.Struct, array_like=True, tag="f", gc=False):
    """Erase everything kept for ``key``; ``cascade`` also erases its stitched anonymous ids."""

    key: str
    cascade: bool = True


Item = Touchpoint | Link | Merge | Forget


class Bundle(msgspec.Struct, gc=False):
    v: int
    at: int
    items: list[Item]


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Bundle)


def encode_bundle(items: list[Any], at_ms: int) -> bytes:
    return _encoder.encode(Bundle(BUNDLE_VERSION, at_ms, items))


_props_decoder = msgspec.json.Decoder(dict[str, Any])


def properties_of(event: Event) -> dict[str, Any]:
    """The event's properties as a dict (decoded on demand)."""
    props = event.properties
    if isinstance(props, dict):
        return props
    return _props_decoder.decode(props)


def touchpoint_item(ts: int, key: str, stage: int, raw_event: bytes) -> tuple[Any, ...]:
    """A Touchpoint for :func:`encode_bundle` that embeds the validated event bytes as they are."""
    return ("t", ts, key, stage, msgspec.Raw(raw_event))


def decode_bundle(data: bytes) -> Bundle:
    """Decode a bundle; raises ``msgspec.DecodeError``/``ValidationError`` on a corrupt one."""
    return _decoder.decode(data)


def _librdkafka_murmur2() -> Callable[[bytes, int], int] | None:
    """librdkafka's own murmur2 partitioner, called with the GIL held, or None.

    ``rd_kafka_msg_partitioner_murmur2`` is public librdkafka API and computes
    exactly ``(murmur2(key) & 0x7fffffff) % partitions``; it ignores its topic
    and opaque arguments. It is loaded with ``ctypes.PyDLL``, which keeps the
    GIL during the call (~0.5 us). The ``murmurhash2`` wheel used before was
    faster alone (~0.2 us) but releases the GIL on every call: with any other
    Python thread runnable (the worker's Kafka consumer thread, Redis writer,
    executor) each call then waited for the GIL, measured 12-27 us per call.
    """
    import confluent_kafka

    here = os.path.dirname(confluent_kafka.__file__)
    candidates = sorted(
        glob.glob(os.path.join(here, os.pardir, "confluent_kafka.libs", "librdkafka*.so*"))
    )
    from ctypes.util import find_library

    system = find_library("rdkafka")
    if system:
        candidates.append(system)
    for path in candidates:
        try:
            fn = ctypes.PyDLL(path).rd_kafka_msg_partitioner_murmur2
        except (OSError, AttributeError):
            continue
        fn.restype = ctypes.c_int32
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
            ctypes.c_int32,
            ctypes.c_void_p,
            ctypes.c_void_p,
        ]
        return lambda data, partitions: fn(None, data, len(data), partitions, None, None)
    return None


def _python_murmur2() -> Callable[[bytes, int], int]:
    from aiokafka.partitioner import murmur2  # pure Python (~3 us), GIL held

    return lambda data, partitions: (murmur2(data) & 0x7FFFFFFF) % partitions


_partition_of_bytes = _librdkafka_murmur2()
if _partition_of_bytes is None:  # pragma: no cover - every confluent-kafka wheel bundles librdkafka
    log.warning("librdkafka's murmur2 partitioner not found: using the pure-Python murmur2")
    _partition_of_bytes = _python_murmur2()


class Partitioner:
    """Kafka's default (murmur2) partitioner for string keys.

    Same function as the Java client, aiokafka (Faust) and librdkafka's
    ``murmur2_random``: ``(murmur2(key) & 0x7fffffff) % partitions`` with
    Kafka's seed, computed by librdkafka itself (:func:`_librdkafka_murmur2`).
    A call costs ~0.5 us, against ~0.03 us for a dict lookup, and a
    customer's events come in runs (a 20k-event batch of the benchmark holds
    ~4k distinct keys). So results are memoised in :attr:`cache`, which is
    *bounded*: it is emptied when it reaches ``cache_size`` keys (an earlier
    unbounded memo held every customer id ever seen: hundreds of MB in a
    10-minute soak). Hot loops may read ``cache`` directly and call the
    partitioner on a miss, which fills it.
    """

    def __init__(self, partitions: int, cache_size: int = 65_536) -> None:
        if partitions < 1:
            raise ValueError("partitions must be >= 1")
        self.partitions = partitions
        self.cache_size = cache_size
        self.cache: dict[str, int] = {}
        self._hash = _partition_of_bytes

    def __call__(self, key: str) -> int:
        cache = self.cache
        partition = cache.get(key)
        if partition is None:
            partition = self._hash(key.encode(), self.partitions)  # type: ignore[misc]
            if len(cache) >= self.cache_size:
                cache.clear()
            cache[key] = partition
        return partition
