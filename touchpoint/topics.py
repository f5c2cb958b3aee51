"""Every topic Touchpoint uses, with partitions and configs, and the command that creates them.

Configs are always set explicitly (Tansu, the embedded broker, reports only
explicitly set configs, and explicit is clearer on real Kafka too). Faust
creates its own changelog topics (compacted) for tables.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from touchpoint.config import KafkaSettings, TopicSettings
from touchpoint.errors import ConfigError

log = logging.getLogger(__name__)

DAY_MS = 24 * 3600 * 1000


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    configs: dict[str, str]
    purpose: str


def topic_specs(topics: TopicSettings) -> list[TopicSpec]:
    """The topics, in pipeline order."""
    keep = str(topics.retention_ms)
    n = topics.partitions
    delete = {"cleanup.policy": "delete", "retention.ms": keep}
    specs = [
        TopicSpec(topics.raw(s), n, dict(delete), f"raw {s} events, as producers sent them")
        for s in topics.sources
    ]
    specs += [
        TopicSpec(
            topics.validated,
            n,
            {"cleanup.policy": "delete", "retention.ms": str(topics.validated_retention_ms)},
            "validated touchpoints, bundled per customer-key partition (internal)",
        ),
        TopicSpec(
            topics.deadletter,
            n,
            {
                "cleanup.policy": "delete",
                "retention.ms": str(max(topics.retention_ms, 30 * DAY_MS)),
            },
            "refused inputs with original bytes and reason",
        ),
        TopicSpec(topics.late, n, dict(delete), "valid events that arrived after their grace"),
        TopicSpec(topics.journeys, n, dict(delete), "closed journeys with summary and outcome"),
        TopicSpec(topics.friction, n, dict(delete), "per-customer friction signals"),
        # One partition: a single alerting stage sees every worker partition's counts.
        TopicSpec(
            topics.signal_counts,
            1,
            {"cleanup.policy": "delete", "retention.ms": str(DAY_MS)},
            "signal counts per window and partition stream times (internal)",
        ),
        # Keyed by alert id: compaction keeps each alert's latest state.
        TopicSpec(
            topics.alerts,
            1,
            {"cleanup.policy": "compact,delete", "retention.ms": keep},
            "spike alerts: firing, then resolved",
        ),
    ]
    return specs


def _admin(kafka: KafkaSettings) -> AdminClient:
    return AdminClient(kafka.librdkafka())


def ensure_topics(
    kafka: KafkaSettings, topics: TopicSettings, timeout: float = 30.0
) -> dict[str, str]:
    """Create missing topics; returns ``{name: "created" | "exists"}``.

    An existing topic with fewer partitions than configured is reported but not
    changed (adding partitions re-maps keys; do it deliberately).
    """
    admin = _admin(kafka)
    specs = topic_specs(topics)
    futures = admin.create_topics(
        [
            NewTopic(s.name, s.partitions, topics.replication_factor, config=s.configs)
            for s in specs
        ],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    outcome: dict[str, str] = {}
    for name, future in futures.items():
        try:
            future.result()
            outcome[name] = "created"
        except KafkaException as exc:
            error = exc.args[0]
            if error.code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            outcome[name] = "exists"
    metadata = admin.list_topics(timeout=timeout)
    for spec in specs:
        found = metadata.topics.get(spec.name)
        if found is not None and found.partitions and len(found.partitions) != spec.partitions:
            log.warning(
                "topic %s has %d partitions, configured %d",
                spec.name,
                len(found.partitions),
                spec.partitions,
            )
    return outcome


def partition_count(client: Producer | AdminClient, topic: str, timeout: float = 30.0) -> int:
    """Number of partitions of ``topic`` (raises ConfigError if it does not exist)."""
    metadata = client.list_topics(topic, timeout=timeout)
    found = metadata.topics.get(topic)
    if found is None or found.error is not None or not found.partitions:
        raise ConfigError(
            "topics",
            [f"topic {topic!r} does not exist; run `touchpoint topics create` first"],
        )
    return len(found.partitions)
