"""Settings: one frozen object per concern, read from the environment.

Every variable is ``TOUCHPOINT_<CONCERN>_<FIELD>`` (for example
``TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS``); lists accept comma-separated values.
Secrets are :class:`pydantic.SecretStr`, so they print as ``**********``.
The mapping to client libraries (librdkafka, aiokafka/Faust, redis-py) is
done in exactly one place per library, here.
"""

from __future__ import annotations

import os
import ssl
import urllib.parse
from functools import cached_property
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AliasChoices,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from touchpoint.errors import ConfigError

_S = TypeVar("_S", bound=BaseSettings)

CHANNELS = ("web", "app", "email", "store", "support", "social", "ads")

CsvList = Annotated[tuple[str, ...], NoDecode]


def _split_csv(value: Any) -> Any:
    if isinstance(value, str):
        return tuple(part.strip() for part in value.split(",") if part.strip())
    return value


def _config(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(env_prefix=prefix, frozen=True, extra="ignore")


class KafkaSettings(BaseSettings):
    """How to reach Kafka. Defaults suit a local broker without security."""

    model_config = _config("TOUCHPOINT_KAFKA_")

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "touchpoint"
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    # Consumer-group session timeout. Tansu (the embedded test broker) holds
    # JoinGroup for half of it, so tests and the demo set 6 s; real Kafka is
    # fine with the librdkafka default of 45 s or anything in between.
    session_timeout_ms: int = Field(default=10_000, ge=1_000)
    heartbeat_interval_ms: int = Field(default=1_000, ge=100)
    # How often librdkafka clients report broker states (touchpoint_kafka_up).
    statistics_interval_ms: int = Field(default=5_000, ge=100)

    @model_validator(mode="after")
    def _check_security(self) -> KafkaSettings:
        sasl_complete = self.sasl_mechanism and self.sasl_username and self.sasl_password
        if self.security_protocol.startswith("SASL") and not sasl_complete:
            raise ValueError(
                f"TOUCHPOINT_KAFKA_SECURITY_PROTOCOL={self.security_protocol} needs "
                "TOUCHPOINT_KAFKA_SASL_MECHANISM, _SASL_USERNAME and _SASL_PASSWORD"
            )
        return self

    @property
    def uses_ssl(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def uses_sasl(self) -> bool:
        return self.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")

    def librdkafka(self) -> dict[str, Any]:
        """The common librdkafka (confluent-kafka) configuration."""
        conf: dict[str, Any] = {
            "bootstrap.servers": self.bootstrap_servers,
            "client.id": self.client_id,
            "security.protocol": self.security_protocol.lower(),
        }
        if self.uses_sasl:
            # Only with a SASL protocol: credentials a client will not use are
            # not handed to it (nor to its config dumps and debug logs).
            conf["sasl.mechanism"] = self.sasl_mechanism
            conf["sasl.username"] = self.sasl_username
            conf["sasl.password"] = self.sasl_password.get_secret_value()  # type: ignore[union-attr]
        if self.uses_ssl:
            if self.ssl_cafile:
                conf["ssl.ca.location"] = self.ssl_cafile
            if self.ssl_certfile:
                conf["ssl.certificate.location"] = self.ssl_certfile
            if self.ssl_keyfile:
                conf["ssl.key.location"] = self.ssl_keyfile
            if self.ssl_key_password:
                conf["ssl.key.password"] = self.ssl_key_password.get_secret_value()
            conf["ssl.endpoint.identification.algorithm"] = (
                "https" if self.ssl_check_hostname else "none"
            )
        return conf

    def librdkafka_consumer(self, group_id: str) -> dict[str, Any]:
        """librdkafka configuration for a consumer in ``group_id`` (manual commits)."""
        return {
            **self.librdkafka(),
            "group.id": group_id,
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "session.timeout.ms": self.session_timeout_ms,
            "heartbeat.interval.ms": self.heartbeat_interval_ms,
            # Large local queues: measured ~2x consume throughput (FIELD-NOTES).
            "queued.min.messages": 200_000,
        }

    def ssl_context(self) -> ssl.SSLContext | None:
        """An SSL context for aiokafka/Faust, or None without TLS."""
        if not self.uses_ssl:
            return None
        ctx = ssl.create_default_context(cafile=self.ssl_cafile)
        ctx.check_hostname = self.ssl_check_hostname
        if self.ssl_certfile:
            ctx.load_cert_chain(
                self.ssl_certfile,
                self.ssl_keyfile,
                self.ssl_key_password.get_secret_value() if self.ssl_key_password else None,
            )
        return ctx

    def faust_credentials(self) -> Any:
        """Broker credentials for Faust (aiokafka), or None for PLAINTEXT."""
        import faust  # local import: only the Faust worker needs it

        if self.uses_sasl:
            assert self.sasl_password is not None and self.sasl_mechanism is not None
            return faust.SASLCredentials(
                username=self.sasl_username,
                password=self.sasl_password.get_secret_value(),
                mechanism=self.sasl_mechanism,
                ssl_context=self.ssl_context(),
            )
        if self.uses_ssl:
            return faust.SSLCredentials(self.ssl_context())
        return None


class TopicSettings(BaseSettings):
    """Topic names and layout. Every name derives from ``prefix`` unless overridden."""

    model_config = _config("TOUCHPOINT_TOPICS_")

    prefix: str = "touchpoints"
    sources: CsvList = ("web", "app", "email", "store", "support")
    partitions: int = Field(default=8, ge=1)
    replication_factor: int = Field(default=1, ge=1)
    # Raw and output topics keep a week by default; the validated stream is
    # internal and can be rebuilt from the raw topics, so it keeps one day.
    retention_ms: int = 7 * 24 * 3600 * 1000
    validated_retention_ms: int = 24 * 3600 * 1000

    _split = field_validator("sources", mode="before")(_split_csv)

    @model_validator(mode="after")
    def _check_names(self) -> TopicSettings:
        reserved = {
            "validated", "deadletter", "late", "journeys", "friction", "alerts", "signal-counts",
        }  # fmt: skip
        clash = reserved.intersection(self.sources)
        if clash:
            raise ValueError(f"source names clash with output topics: {sorted(clash)}")
        if not self.sources:
            raise ValueError("at least one source topic is needed")
        return self

    def raw(self, source: str) -> str:
        return f"{self.prefix}.{source}"

    @property
    def raw_topics(self) -> tuple[str, ...]:
        return tuple(self.raw(s) for s in self.sources)

    @property
    def validated(self) -> str:
        return f"{self.prefix}.validated"

    @property
    def deadletter(self) -> str:
        return f"{self.prefix}.deadletter"

    @property
    def late(self) -> str:
        return f"{self.prefix}.late"

    @property
    def journeys(self) -> str:
        return f"{self.prefix}.journeys"

    @property
    def friction(self) -> str:
        return f"{self.prefix}.friction"

    @property
    def alerts(self) -> str:
        return f"{self.prefix}.alerts"

    @property
    def signal_counts(self) -> str:
        """Internal: each partition's signal counts per window, for the alerting stage."""
        return f"{self.prefix}.signal-counts"


class RedisSettings(BaseSettings):
    """How to reach Redis, where live journeys are mirrored for other services."""

    model_config = _config("TOUCHPOINT_REDIS_")

    enabled: bool = True
    # redis:// or rediss:// (TLS). A password in the URL is masked in reprs,
    # but TOUCHPOINT_REDIS_PASSWORD keeps it out of the URL altogether.
    url: str = "redis://127.0.0.1:6379/0"
    username: str | None = None  # Redis 6 ACL user
    password: SecretStr | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_key_password: SecretStr | None = None
    ssl_check_hostname: bool = True
    key_prefix: str = "touchpoint:"
    journey_ttl_s: int = Field(default=2 * 24 * 3600, ge=1)
    # Live-journey updates buffered while Redis is down or slow (one per
    # customer, newest wins); past this the oldest are dropped and every live
    # journey is re-sent once Redis is back.
    max_pending: int = Field(default=1_000_000, ge=1)

    @model_validator(mode="after")
    def _check_security(self) -> RedisSettings:
        parts = urllib.parse.urlsplit(self.url)
        tls_files = {
            "ssl_cafile": self.ssl_cafile,
            "ssl_certfile": self.ssl_certfile,
            "ssl_keyfile": self.ssl_keyfile,
            "ssl_key_password": self.ssl_key_password,
        }
        tls_set = sorted(name for name, value in tls_files.items() if value)
        if tls_set and parts.scheme != "rediss":
            # redis-py would fail on the first connection with a TypeError.
            names = ", ".join(f"TOUCHPOINT_REDIS_{name.upper()}" for name in tls_set)
            raise ValueError(f"{names} need a rediss:// URL in TOUCHPOINT_REDIS_URL")
        # redis-py lets credentials in the URL win silently over the keyword ones.
        if parts.password and self.password:
            raise ValueError(
                "a password is set both in TOUCHPOINT_REDIS_URL and in "
                "TOUCHPOINT_REDIS_PASSWORD: choose one"
            )
        if parts.username and self.username:
            raise ValueError(
                "a username is set both in TOUCHPOINT_REDIS_URL and in "
                "TOUCHPOINT_REDIS_USERNAME: choose one"
            )
        return self

    @property
    def redacted_url(self) -> str:
        """The URL with any password replaced by ``**********`` (safe to print)."""
        return redact_url(self.url)

    def __repr_args__(self) -> Any:
        for name, value in super().__repr_args__():
            yield name, self.redacted_url if name == "url" else value

    @field_serializer("url", when_used="json")
    def _serialize_url(self, url: str) -> str:
        return redact_url(url)  # as SecretStr fields: masked in JSON dumps

    def client_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis.from_url(self.url, **kwargs)``."""
        kwargs: dict[str, Any] = {}
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password.get_secret_value()
        if self.ssl_cafile:
            kwargs["ssl_ca_certs"] = self.ssl_cafile
        if self.ssl_certfile:
            kwargs["ssl_certfile"] = self.ssl_certfile
        if self.ssl_keyfile:
            kwargs["ssl_keyfile"] = self.ssl_keyfile
        if self.ssl_key_password:
            kwargs["ssl_password"] = self.ssl_key_password.get_secret_value()
        if urllib.parse.urlsplit(self.url).scheme == "rediss":
            kwargs["ssl_check_hostname"] = self.ssl_check_hostname
        return kwargs


def redact_url(url: str) -> str:
    """``url`` with its password (if any) replaced by ``**********``."""
    parts = urllib.parse.urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{user}:**********@{host}"))


class IngestSettings(BaseSettings):
    """The ingest stage: raw topics to the validated, customer-keyed bundle stream."""

    model_config = _config("TOUCHPOINT_INGEST_")

    group_id: str = "touchpoint-ingest"
    # Messages taken per consume() call; one call is one unit of work and commit.
    batch_size: int = Field(default=20_000, ge=1)
    batch_timeout_s: float = Field(default=0.05, gt=0)
    # Touchpoints per bundle message on the validated stream (FIELD-NOTES: ~50+
    # per message amortises Faust's ~165 us per-message cost).
    bundle_max_events: int = Field(default=500, ge=1)
    max_payload_bytes: int = Field(default=16_384, ge=256)
    # Dead letters keep the original bytes up to this size (then a prefix, the
    # size and a SHA-256); the raw topic still holds the whole message.
    deadletter_payload_max_bytes: int = Field(default=65_536, ge=256)
    # Event times before this (epoch ms) or further than max_future_skew_s past
    # the wall clock are absurd and dead-lettered as timestamp_out_of_range.
    min_event_time_ms: int = 946_684_800_000  # 2000-01-01T00:00:00Z
    # Event times more than this ahead of the wall clock are refused: a device
    # with a wrong clock must not push stream time (and lateness) forward.
    max_future_skew_s: int = Field(default=300, ge=0)
    # Event-time alignment of the raw partitions: events more than align_skew_s
    # ahead of the slowest partition that still has data are held back until
    # it catches up (backfills and replays, where one source's whole history
    # could otherwise arrive before another's). Keep it well below the journey
    # grace period. 0 disables alignment.
    align_skew_s: float = Field(default=30.0, ge=0)
    # How long to wait for a lagging partition that delivers nothing before
    # ignoring it for alignment (like Kafka Streams' max.task.idle.ms).
    align_max_wait_s: float = Field(default=5.0, ge=0)
    # ... but a partition known to have unread data (next offset below its
    # high watermark) is waited for up to this long: an overloaded consumer can
    # go seconds without fetching it while it holds the oldest events.
    align_max_backlog_wait_s: float = Field(default=60.0, ge=0)
    # A partition holding this many events back is paused until they drain.
    align_max_held: int = Field(default=200_000, ge=1)


def _parse_channel_gaps(value: Any) -> Any:
    """``store=120,support=60`` (minutes) -> {"store": 120, "support": 60}."""
    if isinstance(value, str):
        out: dict[str, int] = {}
        for part in value.split(","):
            if part.strip():
                channel, _, minutes = part.partition("=")
                out[channel.strip()] = int(minutes)
        return out
    return value


class JourneySettings(BaseSettings):
    """Sessionization (§5). Times in minutes unless the name says otherwise."""

    model_config = _config("TOUCHPOINT_JOURNEY_")

    gap_minutes: float = Field(default=30, gt=0)
    # Per-channel inactivity gaps, e.g. TOUCHPOINT_JOURNEY_CHANNEL_GAP_MINUTES=store=120
    channel_gap_minutes: Annotated[dict[str, float], NoDecode] = Field(default_factory=dict)
    max_duration_minutes: float = Field(default=24 * 60, gt=0)
    grace_minutes: float = Field(default=5, ge=0)
    max_touchpoints: int = Field(default=50, ge=1)
    history: int = Field(default=5, ge=0)
    expire_days: float = Field(default=30, gt=0)

    _gaps = field_validator("channel_gap_minutes", mode="before")(_parse_channel_gaps)

    @field_validator("channel_gap_minutes")
    @classmethod
    def _known_channels(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = set(value) - set(CHANNELS)
        if unknown:
            raise ValueError(f"unknown channels {sorted(unknown)}; known: {CHANNELS}")
        return value

    def session_config(self) -> Any:
        from streams.core.sessionizer import SessionConfig

        minute = 60_000
        return SessionConfig(
            gap_ms=int(self.gap_minutes * minute),
            channel_gap_ms={ch: int(m * minute) for ch, m in self.channel_gap_minutes.items()},
            max_duration_ms=int(self.max_duration_minutes * minute),
            grace_ms=int(self.grace_minutes * minute),
            max_touchpoints=self.max_touchpoints,
            history=self.history,
            expire_ms=int(self.expire_days * 24 * 60 * minute),
        )


class WorkerSettings(BaseSettings):
    """The Faust worker (journeys, rules, alerts, lookups)."""

    model_config = _config("TOUCHPOINT_WORKER_")

    app_id: str = "touchpoint"
    # Faust table store: rocksdb:// in production, memory:// for tests and demos.
    store: str = "rocksdb://"
    data_dir: str = ".touchpoint-data"
    web_host: str = "127.0.0.1"
    web_port: int = 6066
    # How other workers reach this one for lookups (defaults to http://web_host:web_port).
    canonical_url: str | None = None
    # Write-behind: state, changelog, Redis and offset acks are flushed together.
    flush_interval_s: float = Field(default=1.0, gt=0)
    # While the worker works through a backlog (it never waits for input), the
    # flush is deferred up to this long: busy customers are then encoded and
    # written once per this interval, not once per flush_interval_s. Set it to
    # flush_interval_s (or lower) to turn deferral off. See streams/pacing.py.
    flush_backlog_interval_s: float = Field(default=3.0, gt=0)
    # Flush early when this many bundles wait for their ack (bounds replay after
    # a crash, and the bundles held in memory); past twice this the agent waits.
    max_unacked_bundles: int = Field(default=600, ge=1)
    sweep_interval_s: float = Field(default=1.0, gt=0)
    # Bundles the consumer skipped (a Faust rebalance race, see
    # JourneyProcessor.missing) are read again from Kafka and applied, up to
    # this many at once; a larger skip is taken as an offset reset on purpose.
    refetch_max_bundles: int = Field(default=10_000, ge=0)
    # How long the broker may hold the bundle consumer's fetch when the partitions
    # in it have nothing new. aiokafka keeps one fetch in flight per broker, so
    # partitions drained meanwhile wait behind it; Faust hardcodes 1,500 ms.
    # See JourneyStage's consumer (streams/app.py).
    fetch_max_wait_ms: int = Field(default=100, ge=1, le=1500)
    # Wall-clock seconds of silence before a partition's stream time follows the wall clock.
    idle_s: float = Field(default=5.0, ge=0)
    standby_replicas: int = Field(default=1, ge=0)
    # A changelog recovery that reads nothing for this long has its partitions
    # sought again (up to 3 times); after 4 x this, the worker exits for a
    # restart (streams/watchdog.py: a known Faust recovery hang). 0: never.
    recovery_stall_s: float = Field(default=15.0, ge=0)
    # Tansu (the embedded test broker) reports a wrong high watermark for batched
    # writes, which cuts Faust's changelog recovery short; tests and the demo
    # write changelog records one per batch. Never needed on real Kafka.
    changelog_single_record_batches: bool = False
    # Friction rules and spike settings (TOML); default: the built-in rules of SPEC §6.
    # TOUCHPOINT_RULES_FILE (TOUCHPOINT_WORKER_RULES_FILE works too).
    rules_file: str | None = Field(
        default=None,
        validation_alias=AliasChoices("TOUCHPOINT_RULES_FILE", "TOUCHPOINT_WORKER_RULES_FILE"),
    )

    @property
    def url(self) -> str:
        return self.canonical_url or f"http://{self.web_host}:{self.web_port}"

    @property
    def state_dir(self) -> str:
        """This worker's own local state (RocksDB): one per app id and web port.

        Faust does not separate apps in a shared directory, and two workers
        on one host must not share RocksDB files (a second app crashed on the
        first one's persisted offsets). The same worker restarted on the same
        port finds its state again and recovers incrementally.
        """
        return os.path.join(self.data_dir, f"{self.app_id}-{self.web_port}")


class MetricsSettings(BaseSettings):
    model_config = _config("TOUCHPOINT_METRICS_")

    port: int = 9464
    host: str = "0.0.0.0"


class CollectorSettings(BaseSettings):
    """The HTTP collector (:mod:`touchpoint.collector`): events over HTTP to the raw topics.

    ``tokens`` is a comma-separated list of bearer tokens (write keys), each at
    least 16 characters. Without tokens the collector refuses to start unless
    ``allow_anonymous`` is true (then any caller may post, rate-limited per
    client address). Both at once is refused as ambiguous.
    """

    model_config = _config("TOUCHPOINT_COLLECTOR_")

    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65_535)
    tokens: SecretStr | None = None
    allow_anonymous: bool = Field(default=False, validate_default=True)
    # The whole request body, enforced while reading (one event is further
    # bounded by TOUCHPOINT_INGEST_MAX_PAYLOAD_BYTES, as in ingest).
    max_body_bytes: int = Field(default=1_048_576, ge=1_024)
    max_batch_events: int = Field(default=500, ge=1)
    # Token bucket per token (per client address when anonymous), in events.
    rate_limit_per_s: float = Field(default=1_000.0, gt=0)
    rate_limit_burst: int = Field(default=2_000, ge=1)
    # Origins allowed to call from browsers (CORS); "*" allows any. Empty: no CORS.
    cors_origins: CsvList = ()
    # How long a request waits for the broker to confirm delivery before a 503.
    delivery_timeout_s: float = Field(default=10.0, gt=0)

    _split = field_validator("cors_origins", mode="before")(_split_csv)

    @field_validator("tokens")
    @classmethod
    def _check_tokens(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return None
        tokens = _split_csv(value.get_secret_value())
        if not tokens:
            return None
        if any(len(token) < 16 for token in tokens):
            # Never echo the token itself: the message may end up in logs.
            raise ValueError("every token needs at least 16 characters")
        return value

    @field_validator("allow_anonymous")
    @classmethod
    def _check_anonymous(cls, value: bool, info: ValidationInfo) -> bool:
        if "tokens" not in info.data:
            return value  # the tokens themselves were refused; that error says enough
        has_tokens = info.data["tokens"] is not None
        if not value and not has_tokens:
            raise ValueError(
                "no tokens configured: set TOUCHPOINT_COLLECTOR_TOKENS, or "
                "TOUCHPOINT_COLLECTOR_ALLOW_ANONYMOUS=true to accept unauthenticated posts"
            )
        if value and has_tokens:
            raise ValueError("allow_anonymous=true and tokens are both set: choose one")
        return value

    @field_validator("rate_limit_burst")
    @classmethod
    def _check_burst(cls, value: int, info: ValidationInfo) -> int:
        batch = info.data.get("max_batch_events")
        if batch is not None and value < batch:
            # A full batch costs max_batch_events; a smaller bucket could never grant it.
            raise ValueError(f"must be at least max_batch_events ({batch})")
        return value

    def token_list(self) -> tuple[str, ...]:
        """The configured tokens (secret values: never log or print them)."""
        if self.tokens is None:
            return ()
        return tuple(_split_csv(self.tokens.get_secret_value()))


class Settings:
    """All settings, each concern read lazily from the environment."""

    @cached_property
    def kafka(self) -> KafkaSettings:
        return load(KafkaSettings)

    @cached_property
    def topics(self) -> TopicSettings:
        return load(TopicSettings)

    @cached_property
    def redis(self) -> RedisSettings:
        return load(RedisSettings)

    @cached_property
    def ingest(self) -> IngestSettings:
        return load(IngestSettings)

    @cached_property
    def journey(self) -> JourneySettings:
        return load(JourneySettings)

    @cached_property
    def worker(self) -> WorkerSettings:
        return load(WorkerSettings)

    @cached_property
    def metrics(self) -> MetricsSettings:
        return load(MetricsSettings)

    @cached_property
    def collector(self) -> CollectorSettings:
        return load(CollectorSettings)


def load(cls: type[_S], **overrides: Any) -> _S:
    """Read ``cls`` from the environment, turning validation errors into :class:`ConfigError`."""
    try:
        return cls(**overrides)
    except ValidationError as exc:
        prefix = cls.model_config.get("env_prefix", "")
        problems = [
            # Errors of the whole object (no loc) name their variables themselves.
            f"{prefix}{'_'.join(str(p) for p in err['loc']).upper()}: {err['msg']}"
            if err["loc"]
            else err["msg"]
            for err in exc.errors()
        ]
        raise ConfigError(cls.__name__, problems) from None
