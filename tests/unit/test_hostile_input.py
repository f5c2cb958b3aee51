"""Hostile input through the pure ingest transform: every case gets its reason, nothing raises.

The corpus (tests/corpus/hostile + generated cases, see tests/hostile.py) goes
through :class:`streams.ingest.Ingestor` exactly as a batch read from Kafka
would. The same corpus goes through a running ingest against the real broker
in tests/integration/test_hostile_input.py; here it also goes through the
collector's verdicts, which must give ingest's reasons.
"""

from __future__ import annotations

import json
from typing import Any

import confluent_kafka
import pytest

from schemas.decoder import EventDecoder, Rejection
from schemas.registry import event_schemas
from streams.bundles import Partitioner, Touchpoint, decode_bundle, encode_bundle
from streams.core.rules import load_rules
from streams.core.sessionizer import MINUTE, SessionConfig
from streams.ingest import Ingestor
from tests.harness import run_pipeline
from tests.hostile import CORPUS, MANIFEST, Case, all_cases, check_dead_letter, event
from touchpoint import jsonio
from touchpoint.collector import JSON, judge, split_body
from touchpoint.config import IngestSettings, TopicSettings

NOW_S = 1_795_000_000.0  # 2026-11-18
SETTINGS = IngestSettings()
TOPIC = "tp.web"


def ingestor(settings: IngestSettings = SETTINGS) -> Ingestor:
    decoder = EventDecoder(
        max_payload_bytes=settings.max_payload_bytes,
        min_event_time_ms=settings.min_event_time_ms,
        max_future_skew_s=settings.max_future_skew_s,
        clock=lambda: NOW_S,
    )
    return Ingestor(
        decoder,
        Partitioner(4),
        {TOPIC: "web"},
        deadletter_payload_max_bytes=settings.deadletter_payload_max_bytes,
    )


def key_for(i: int) -> bytes | None:
    """No key, a customer-like key, binary junk or an oversized key, in turn."""
    return [None, f"cust-{i}".encode(), b"\xff\x00\xfe", b"k" * 5000][i % 4]


def run(cases: list[Case], settings: IngestSettings = SETTINGS) -> tuple[Any, dict[int, Any]]:
    """Ingest ``cases`` as one batch; returns the result and the dead letters by offset."""
    messages = [
        confluent_kafka.Message(
            topic=TOPIC,
            partition=3,
            offset=100 + i,
            key=key_for(i),
            value=case.value,
            timestamp=(1, int(NOW_S * 1000)),
        )
        for i, case in enumerate(cases)
    ]
    result = ingestor(settings).process(messages, int(NOW_S * 1000))
    dead = {}
    for _key, value in result.dead:
        doc = jsonio.loads(value)
        dead[doc["source"]["offset"]] = doc
    return result, dead


def accepted_offsets(result: Any) -> dict[int, Any]:
    return {
        offset: item
        for entries in result.entries.values()
        for _ts, offset, _target, item in entries
        if isinstance(item, tuple)
    }


def test_the_manifest_lists_every_corpus_file_once() -> None:
    files = {p.name for p in CORPUS.iterdir() if p.name != "manifest.json"}
    listed = [*MANIFEST["rejected"], *MANIFEST["accepted"]]
    assert sorted(listed) == sorted(files)
    assert len(MANIFEST["rejected"]) >= 150


def test_every_hostile_input_is_dead_lettered_with_its_reason() -> None:
    cases = all_cases(SETTINGS, int(NOW_S * 1000))
    result, dead = run(cases)
    accepted = accepted_offsets(result)
    assert len(dead) + len(accepted) == len(cases)
    for i, case in enumerate(cases):
        offset = 100 + i
        if case.reason is None:
            assert offset in accepted, (case.name, dead.get(offset, {}).get("detail"))
            continue
        assert offset not in accepted, case.name
        check_dead_letter(
            dead[offset],
            case,
            topic=TOPIC,
            partition=3,
            offset=offset,
            key=key_for(i),
            payload_limit=SETTINGS.deadletter_payload_max_bytes,
        )
    assert sum(result.rejected.values()) == len(dead)
    assert set(result.rejected) == {("web", case.reason) for case in cases if case.reason}


def test_accepted_oddities_reach_the_journey_stage_as_ingest_read_them() -> None:
    """Duplicate keys: ingest routes by the last value, and the worker decodes the same."""
    cases = [c for c in all_cases(SETTINGS, int(NOW_S * 1000)) if c.reason is None]
    result, dead = run(cases)
    assert dead == {}
    bundles = {
        target: decode_bundle(encode_bundle(items, 0)).items
        for target, items in result.bundles.items()
    }
    partition_of = Partitioner(4)
    touchpoints = [
        (target, item) for target, items in bundles.items() for item in items
        if isinstance(item, Touchpoint)
    ]  # fmt: skip
    assert len(touchpoints) == len(cases)
    for target, tp in touchpoints:
        assert target == partition_of(tp.key) and tp.key == tp.event.customer_id
    by_id = {tp.event.event_id: tp for _t, tp in touchpoints}
    assert by_id["ev-dup-keys"].key == "cust-last"
    assert "ev-nul\x00escape" in by_id


def test_duplicate_event_ids_pass_ingest_and_count_once_in_the_journey() -> None:
    """Ingest is stateless and forwards both copies; the journey stage drops the second."""
    t0 = 1_793_607_300_000
    first = json.loads(event("ev-1", t0))
    later = json.loads(event("ev-2", t0 + 60_000))
    # Another event 2 h later moves stream time past the gap, so the journey closes.
    after = json.loads(event("ev-3", t0 + 120 * MINUTE))
    out, _alerts = run_pipeline(
        [first, later, first, first], load_rules(), SessionConfig(), batch=2
    )
    assert out.records.get(out.topics.journeys) is None
    out, _alerts = run_pipeline(
        [first, later, first, after], load_rules(), SessionConfig(), batch=2
    )
    (summary,) = out.records[out.topics.journeys]
    assert summary["touchpoint_count"] == 2 and summary["duplicates"] == 1
    ids = [tp[1] if isinstance(tp, list) else tp["event_id"] for tp in summary["touchpoints"]]
    assert ids == ["ev-1", "ev-2"]


_SAMPLES = {"null": None, "string": "7", "integer": 7, "number": 1.5, "boolean": True,
            "array": [], "object": {}}  # fmt: skip


def _wrong_values(prop: dict[str, Any]) -> list[Any]:
    """JSON values of a type ``prop`` does not allow."""
    alternatives = prop.get("oneOf", [prop])
    # const/enum: strings
    allowed = {alt.get("type", "string") for alt in alternatives}
    if "number" in allowed:
        allowed.add("integer")
    return [value for kind, value in _SAMPLES.items() if kind not in allowed]


def wrong_type_cases() -> list[tuple[str, bytes]]:
    cases = []
    for uri, doc in sorted(event_schemas().items()):
        example = doc["examples"][0]
        fields = [*doc["required"], "customer_id", "anonymous_id", "session_hint"]
        for name in fields:
            for value in _wrong_values(doc["properties"][name]):
                changed = {**example, name: value}
                cases.append(
                    (f"{uri.split('/')[1]}.{name}={value!r}", json.dumps(changed).encode())
                )
        props = doc["properties"]["properties"]
        for name in props.get("required", ()):
            for value in _wrong_values(props["properties"][name]):
                changed = {**example, "properties": {**example["properties"], name: value}}
                cases.append(
                    (
                        f"{uri.split('/')[1]}.properties.{name}={value!r}",
                        json.dumps(changed).encode(),
                    )
                )
    return cases


def test_wrong_types_in_every_required_field_of_every_schema() -> None:
    decoder = ingestor().decoder
    cases = wrong_type_cases()
    assert len(cases) > 500
    for name, data in cases:
        verdict = decoder.validate(data)
        assert isinstance(verdict, Rejection) and verdict.reason == "wrong_type", (name, verdict)
    # And in one batch through ingest: all dead-lettered as wrong_type.
    result, dead = run([Case(name, data, "wrong_type") for name, data in cases])
    assert accepted_offsets(result) == {}
    assert {doc["reason"] for doc in dead.values()} == {"wrong_type"}


@pytest.mark.parametrize("depth", [1_000, 10_000, 100_000])
def test_deep_nesting_is_refused_without_recursion_errors(depth: int) -> None:
    """With a payload limit high enough for the parser to see it all."""
    levels = max(depth, 2_000)  # objects: beyond the decoder's depth limit
    roomy = IngestSettings(max_payload_bytes=6 * levels + 100)
    opened, closed = b"[" * depth, b"]" * depth
    cases = [
        Case("arrays", opened + closed, "not_an_object"),
        Case("in_schema", b'{"schema":' + opened + closed + b"}", "too_deeply_nested"),
        Case("unclosed", b'{"schema":' + opened, "too_deeply_nested"),
        Case("objects", b'{"a":' * levels + b"1" + b"}" * levels, "too_deeply_nested"),
        Case(
            "in_properties",
            event("ev-deep", properties={"url": "/"}).replace(
                b'{"url": "/"}', b'{"url": "/", "x": ' + opened + closed + b"}"
            ),
            "unknown_field",
        ),
    ]
    _result, dead = run(cases, roomy)
    assert [dead[100 + i]["reason"] for i in range(len(cases))] == [c.reason for c in cases]


def test_the_collector_gives_the_same_reasons_for_a_body_of_each_case() -> None:
    """A POSTed body that is one hostile input gets ingest's reason (same decoder)."""
    decoder = ingestor().decoder
    cases = [
        c
        for c in all_cases(SETTINGS, int(NOW_S * 1000))
        # Empty bodies are refused whole (400); a body starting with [ is a batch.
        if c.value and c.value.strip() and not c.value.lstrip().startswith(b"[")
    ]
    assert len(cases) > 150
    for case in cases:
        split = split_body(case.value or b"", JSON, 500)
        if isinstance(split, Rejection):  # a body that cannot be split at all
            reason = split.reason
        else:
            (verdict,) = judge(decoder, split, TopicSettings(), None)
            reason = verdict.rejection.reason if verdict.rejection else None
        assert reason == case.reason, case.name
