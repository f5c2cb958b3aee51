"""Prometheus metrics. Names: ``touchpoint_`` prefix, base units, ``_total`` counters.

Labels never carry customer ids (unbounded cardinality): only source, channel,
event type, reason, rule, outcome, stage and similar small sets.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import Counter, Gauge, Histogram, start_http_server

_children: dict[tuple[Any, tuple[str, ...]], Any] = {}


def child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, memoised: for hot paths (the worker's per-bundle counts).

    ``labels()`` takes a lock and builds a key each call (~2 us); the worker
    makes ~30 such calls per bundle. Only for metrics whose children are never
    removed (a removed child would be kept here and count into the void):
    not :data:`CONSUMER_LAG` or :data:`KAFKA_UP`. Bounded like the metric's
    own label sets.
    """
    key = (metric, labels)
    found = _children.get(key)
    if found is None:
        found = _children[key] = metric.labels(*labels)
    return found


# Ingest: raw topics -> validated bundles.
EVENTS_IN = Counter(
    "touchpoint_events_in_total",
    "Events accepted by ingest, by channel and event type.",
    ["channel", "event_type"],
)
EVENTS_REJECTED = Counter(
    "touchpoint_events_rejected_total",
    "Inputs refused and sent to the dead-letter topic, by source and reason.",
    ["source", "reason"],
)
INGEST_BATCHES = Counter("touchpoint_ingest_batches_total", "Batches processed by ingest.")
INGEST_BUNDLES = Counter(
    "touchpoint_ingest_bundles_total", "Bundle messages written to the validated stream."
)
INGEST_RETRIES = Counter(
    "touchpoint_ingest_batch_retries_total",
    "Batches re-read because their output could not be delivered.",
)
INGEST_BATCH_SECONDS = Histogram(
    "touchpoint_ingest_batch_duration_seconds",
    "Time to decode, route and deliver one ingest batch.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
INGEST_PAUSED = Gauge(
    "touchpoint_ingest_paused_partitions",
    "Raw partitions paused because they ran ahead in event time (alignment).",
)
# Both consumers: ingest (raw topics) and the worker (validated stream).
CONSUMER_LAG = Gauge(
    "touchpoint_consumer_lag_messages",
    "Messages not yet processed: high watermark minus the next offset to process, "
    "by consumer group, topic and partition (refreshed about every second by ingest, "
    "every few seconds by the worker, from the client's cached watermarks).",
    ["group", "topic", "partition"],
)
INGEST_EVENT_TIME_LAG = Gauge(
    "touchpoint_ingest_event_time_lag_seconds",
    "Wall clock minus the newest event time seen by ingest in its last batch.",
)

# Journeys (the Faust worker).
EVENTS_APPLIED = Counter(
    "touchpoint_events_out_total",
    "Touchpoints applied to journeys, by channel and event type.",
    ["channel", "event_type"],
)
EVENTS_LATE = Counter(
    "touchpoint_events_late_total",
    "Valid events that arrived after the grace period (sent to the late topic).",
    ["channel"],
)
BUNDLES_REFETCHED = Counter(
    "touchpoint_bundles_refetched_total",
    "Bundles the worker's consumer skipped around a rebalance, read again and applied.",
)
BUNDLES_SKIPPED = Counter(
    "touchpoint_bundles_skipped_total",
    "Bundles never applied: gone from the topic (retention), or a skip over "
    "refetch_max_bundles (offsets reset on purpose).",
)
RECOVERY_NUDGES = Counter(
    "touchpoint_recovery_nudges_total",
    "Changelog recoveries that made no progress for TOUCHPOINT_WORKER_RECOVERY_STALL_S "
    "and had their partitions sought again.",
)
EVENTS_DUPLICATE = Counter(
    "touchpoint_events_duplicate_total", "Redelivered events (same event_id) ignored."
)
JOURNEYS_ACTIVE = Gauge(
    "touchpoint_journeys_active", "Open journeys on this worker, by current stage.", ["stage"]
)
JOURNEYS_COMPLETED = Counter(
    "touchpoint_journeys_completed_total", "Closed journeys by outcome.", ["outcome"]
)
JOURNEY_FURTHEST_STAGE = Counter(
    "touchpoint_journeys_furthest_stage_total",
    "Closed journeys by the furthest stage they reached (none, awareness ... advocacy): the funnel.",
    ["stage"],
)
JOURNEY_CARTS = Counter(
    "touchpoint_journey_carts_total",
    "Closed journeys that had a cart, by how it ended (purchased, abandoned): cart abandonment.",
    ["status"],
)
SURVEY_RESPONSES = Counter(
    "touchpoint_survey_responses_total",
    "Survey responses applied to journeys, by survey (nps, csat, ces), channel and score "
    "(NPS 0-10, CSAT 1-5, CES 1-7: a bounded label).",
    ["survey", "channel", "score"],
)
JOURNEY_DURATION = Histogram(
    "touchpoint_journey_duration_seconds",
    "Event-time duration of closed journeys.",
    buckets=(0, 30, 60, 300, 600, 1800, 3600, 7200, 21600, 86400),
)
JOURNEY_LENGTH = Histogram(
    "touchpoint_journey_touchpoints",
    "Touchpoints per closed journey.",
    buckets=(1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 144),
)
STAGE_TRANSITIONS = Counter(
    "touchpoint_stage_transitions_total",
    "Changes of a live journey's current stage.",
    ["from_stage", "to_stage"],
)
PROCESSING_LAG = Gauge(
    "touchpoint_processing_lag_seconds",
    "Wall clock minus the event time of the newest touchpoint applied, per partition.",
    ["partition"],
)
STREAM_TIME = Gauge(
    "touchpoint_stream_time_seconds", "Stream time (epoch seconds) per partition.", ["partition"]
)
STATE_FLUSH_SECONDS = Histogram(
    "touchpoint_state_flush_duration_seconds",
    "Write-behind flush: changelog, Redis hand-off and delivery wait.",
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
)
FLUSHES_DEFERRED = Counter(
    "touchpoint_state_flushes_deferred_total",
    "Flush timer ticks skipped because the worker was working through a backlog "
    "(see TOUCHPOINT_WORKER_FLUSH_BACKLOG_INTERVAL_S).",
)
CHANGELOG_RECORDS = Counter(
    "touchpoint_changelog_records_total", "State records written to the changelog."
)
# A counter, not a histogram: observing every state cost ~3 us (per-call lock);
# bytes / records gives the mean state size.
STATE_BYTES = Counter(
    "touchpoint_state_bytes_total", "Bytes of customer state written to the changelog."
)

# Friction signals and spike alerts.
FRICTION_SIGNALS = Counter(
    "touchpoint_friction_signals_total",
    "Friction signals raised, by rule and channel.",
    ["rule", "channel"],
)
ALERTS = Counter(
    "touchpoint_alerts_total",
    "Spike alert transitions, by rule, channel and state.",
    ["rule", "channel", "state"],
)
ALERTS_FIRING = Gauge(
    "touchpoint_alerts_firing",
    "1 while a spike alert is firing for the rule and channel.",
    ["rule", "channel"],
)
ALERT_WINDOW_SIGNALS = Gauge(
    "touchpoint_alert_window_signals",
    "Signals counted in the last closed window, by rule and channel.",
    ["rule", "channel"],
)
ALERT_LATE_SIGNALS = Counter(
    "touchpoint_alert_late_signals_total",
    "Friction signals reported after their window had closed (not in any alert window).",
)
ALERT_SILENT_PARTITIONS = Gauge(
    "touchpoint_alert_silent_partitions",
    "Worker partitions whose signal-count reports stopped: windows close without them.",
)
ALERT_BASELINE = Gauge(
    "touchpoint_alert_baseline_signals",
    "EWMA baseline of signals per window, by rule and channel.",
    ["rule", "channel"],
)

# Redis mirror of live journeys.
REDIS_PENDING = Gauge(
    "touchpoint_redis_pending_journeys", "Live-journey updates waiting for Redis."
)
REDIS_WRITES = Counter(
    "touchpoint_redis_writes_total", "Live-journey keys written or deleted in Redis."
)
REDIS_ERRORS = Counter("touchpoint_redis_errors_total", "Failed Redis write attempts (retried).")
REDIS_DROPPED = Counter(
    "touchpoint_redis_dropped_updates_total",
    "Updates dropped because the Redis buffer was full (a full resync follows).",
)
REDIS_UP = Gauge("touchpoint_redis_up", "1 when the last Redis write succeeded.")

# Kafka reachability, per librdkafka client of the process (from its statistics).
KAFKA_UP = Gauge(
    "touchpoint_kafka_up",
    "1 while the client is connected to at least one Kafka broker, 0 while none answers.",
    ["client"],
)


def serve(port: int, host: str = "0.0.0.0") -> None:
    """Expose /metrics on ``host:port`` from a background thread."""
    start_http_server(port, addr=host)
