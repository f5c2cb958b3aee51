"""The HTTP collector: browsers and apps that cannot speak Kafka POST events to the raw topics.

Routes (one port, default 8080):

- ``POST /v1/events``: one event or a batch; each event goes to the raw topic
  of its channel, chosen like :class:`touchpoint.producer.TouchpointProducer`
  does (:data:`~touchpoint.producer.SOURCE_OF_CHANNEL`).
- ``POST /v1/events/{source}``: the same, every event to ``<prefix>.<source>``
  (404 for a source that is not configured).
- ``OPTIONS`` on both: CORS preflight for the configured origins.
- ``GET /health`` and ``GET /metrics`` (Prometheus, ``touchpoint_collector_*``),
  without authentication.

Bodies: ``Content-Type: application/json`` (or ``text/plain``, which browsers
send without a preflight, or none) holds one event object or a JSON array of
events; ``application/x-ndjson`` (also ``application/jsonl``,
``application/json-lines``) holds JSON Lines, one event per non-empty line.
Each array element or line is validated as it was sent, byte for byte, by the
same :class:`~schemas.decoder.EventDecoder` ingest uses (built from the
``TOUCHPOINT_INGEST_*`` limits), so the verdicts and reason codes are ingest's.
Accepted events are published unchanged, keyed by customer id (else anonymous
id), with the producer's config (idempotent, murmur2 partitioner).

Checks, in order, and what they answer (errors are ``{"error": code, "detail": text}``):

1. ``Authorization: Bearer <token>`` against ``TOUCHPOINT_COLLECTOR_TOKENS``
   (SHA-256 digests compared with :func:`hmac.compare_digest`): 401
   ``missing_token`` / ``invalid_token``. With no tokens configured the
   collector refuses to start unless ``TOUCHPOINT_COLLECTOR_ALLOW_ANONYMOUS=true``.
2. Unknown source in the route: 404 ``unknown_source``. Unsupported content
   type: 415.
3. Body larger than ``max_body_bytes``: 413 ``body_too_large``, enforced while
   reading (a Content-Length over the limit is refused before reading; a
   chunked body is read only up to the limit). More than ``max_batch_events``
   events: 413 ``too_many_events``. Empty body or batch: 400.
4. Rate limit: a token bucket per token (per client address when anonymous)
   of ``rate_limit_per_s`` events per second and ``rate_limit_burst`` events;
   a request costs its number of events. Over it: 429 ``rate_limited`` with
   ``Retry-After`` (whole seconds). Nothing is taken from the bucket then.
5. Per event verdicts, then publishing. Every accepted event goes to its raw
   topic; every rejected one goes to the dead-letter topic (stage
   ``collector``, source topic = the raw topic it was meant for, partition
   and offset -1). The answer lists every event in order::

       {"accepted": 1, "rejected": 1, "results": [
         {"index": 0, "status": "accepted", "event_id": "ev-1"},
         {"index": 1, "status": "rejected", "reason": "missing_identity",
          "detail": "needs at least one of anonymous_id, customer_id", "path": "$"}]}

   Status 200 when all were accepted, 207 when some were and some not, 400
   when none was. A JSON array that cannot be parsed at all is one input: it
   is dead-lettered whole (``malformed_json``, ``invalid_encoding`` or
   ``too_deeply_nested``) and answered 400 with ``"dead_lettered": true``.
   The answer comes after the broker confirmed every write; if it does not
   within ``delivery_timeout_s``: 503 ``broker_unavailable`` with
   ``Retry-After``. Delivery is at least once: a client that retries after a
   503 or a lost answer may publish an event twice, which journeys count once
   (same ``event_id``).

Refusals of the whole request (401, 403, 404, 413, 415, 429) write nothing to
Kafka: the client still holds its events and is told why. From step 5 on,
every input ends either on a raw topic or in the dead-letter topic.

CORS: for an ``Origin`` listed in ``TOUCHPOINT_COLLECTOR_CORS_ORIGINS`` (or
any, with ``*``) every answer, errors included, carries
``Access-Control-Allow-Origin`` and exposes ``Retry-After``; a preflight gets
204 with ``Access-Control-Allow-Methods: POST, OPTIONS`` and
``Access-Control-Allow-Headers: Authorization, Content-Type``. A preflight
from another origin gets 403. Tokens travel in a header, never in the URL, so
``navigator.sendBeacon`` (which cannot set headers) is not supported.

Secrets: tokens are kept only as SHA-256 digests. Logs, errors and reprs show
at most a token's fingerprint (the first 8 hex digits of its SHA-256).
Rate limits are per process: N collectors behind a load balancer allow N times
the rate.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec
from aiohttp import web
from confluent_kafka import KafkaError, KafkaException, Message, Producer
from msgspec import UNSET
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

from schemas.decoder import EventDecoder, Rejection, _classify_decode_error
from sinks import deadletter
from touchpoint import jsonio
from touchpoint.config import (
    CollectorSettings,
    IngestSettings,
    KafkaSettings,
    Settings,
    TopicSettings,
)
from touchpoint.errors import TouchpointError
from touchpoint.producer import (
    SOURCE_OF_CHANNEL,
    StallWatch,
    broker_health,
    producer_config,
    retire,
)
from touchpoint.topics import partition_count

log = logging.getLogger(__name__)

STAGE = "collector"

# ---------------------------------------------------------------- metrics
REQUESTS = Counter(
    "touchpoint_collector_requests_total", "HTTP requests answered, by status code.", ["status"]
)
EVENTS_ACCEPTED = Counter(
    "touchpoint_collector_events_accepted_total",
    "Events accepted and published to a raw topic, by source.",
    ["source"],
)
EVENTS_REJECTED = Counter(
    "touchpoint_collector_events_rejected_total",
    "Inputs refused and sent to the dead-letter topic, by source and reason.",
    ["source", "reason"],
)
AUTH_FAILURES = Counter(
    "touchpoint_collector_auth_failures_total",
    "Requests refused for a missing or wrong token.",
    ["reason"],
)
RATE_LIMITED = Counter(
    "touchpoint_collector_rate_limited_total", "Requests refused by the rate limit (429)."
)
DELIVERY_FAILURES = Counter(
    "touchpoint_collector_delivery_failures_total",
    "Requests answered 503 because the broker did not confirm every write.",
)
REQUEST_SECONDS = Histogram(
    "touchpoint_collector_request_duration_seconds",
    "Time to answer a POST, delivery to the broker included.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10),
)


# ---------------------------------------------------------------- refusals
class RequestRefused(TouchpointError):
    """A request refused as a whole: the HTTP status, a code and a human detail."""

    def __init__(
        self, status: int, code: str, detail: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.headers = headers or {}


def _json(status: int, body: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status, body=jsonio.dumps(body), content_type="application/json", headers=headers
    )


# ---------------------------------------------------------------- auth
def fingerprint(token: str) -> str:
    """A token's loggable identity: the first 8 hex digits of its SHA-256."""
    return hashlib.sha256(token.encode()).hexdigest()[:8]


@dataclass(frozen=True, slots=True)
class Principal:
    """Who posted: ``key`` buckets the rate limit, ``name`` is safe to log."""

    key: str
    name: str


class Authenticator:
    """Checks ``Authorization: Bearer <token>`` headers; keeps only the tokens' digests."""

    def __init__(self, tokens: Sequence[str], *, allow_anonymous: bool = False) -> None:
        if not tokens and not allow_anonymous:
            raise ValueError("no tokens and anonymous access not allowed")
        self._digests = tuple((hashlib.sha256(t.encode()).digest(), fingerprint(t)) for t in tokens)
        self.allow_anonymous = allow_anonymous and not tokens

    def __repr__(self) -> str:
        return f"Authenticator({len(self._digests)} tokens, anonymous={self.allow_anonymous})"

    def check(self, authorization: str | None, remote: str | None = None) -> Principal:
        """The caller's principal, or :class:`RequestRefused` (401)."""
        if self.allow_anonymous:
            address = remote or "unknown"
            return Principal(f"addr:{address}", f"anonymous@{address}")
        if not authorization:
            raise _unauthorized("missing_token", "send Authorization: Bearer <token>")
        scheme, _, credentials = authorization.strip().partition(" ")
        presented = credentials.strip()
        if scheme.lower() != "bearer" or not presented:
            raise _unauthorized("invalid_token", "the Authorization header is not Bearer <token>")
        digest = hashlib.sha256(presented.encode("utf-8", "surrogateescape")).digest()
        found = None
        for known, name in self._digests:  # no early exit: timing does not tell which one
            if hmac.compare_digest(digest, known):
                found = name
        if found is None:
            raise _unauthorized("invalid_token", "the token is not valid")
        return Principal(f"token:{found}", f"token {found}")


def _unauthorized(code: str, detail: str) -> RequestRefused:
    AUTH_FAILURES.labels(code).inc()
    # RFC 6750 section 3: no error code when the request carried no credentials.
    challenge = 'Bearer realm="touchpoint"'
    if code == "invalid_token":
        challenge += ', error="invalid_token"'
    return RequestRefused(401, code, detail, {"WWW-Authenticate": challenge})


# ---------------------------------------------------------------- rate limit
class RateLimiter:
    """Token buckets per key: ``rate`` per second, at most ``burst`` saved up.

    ``acquire(key, cost)`` takes ``cost`` tokens and returns 0.0, or takes
    nothing and returns the seconds until ``cost`` tokens will be there. At
    most ``max_keys`` buckets are kept (least recently used go first; a
    forgotten key starts again with a full bucket).
    """

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("rate and burst must be positive")
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def acquire(self, key: str, cost: float = 1.0) -> float:
        if cost > self.burst:
            raise ValueError(f"cost {cost} can never be granted by a bucket of {self.burst}")
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            tokens = self.burst
            if len(self._buckets) >= self.max_keys:
                self._buckets.popitem(last=False)
        else:
            saved, then = bucket
            tokens = min(self.burst, saved + max(0.0, now - then) * self.rate)
            self._buckets.move_to_end(key)
        if tokens >= cost:
            self._buckets[key] = (tokens - cost, now)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (cost - tokens) / self.rate

    def __len__(self) -> int:
        return len(self._buckets)


# ---------------------------------------------------------------- bodies
JSON = "json"
JSON_LINES = "jsonl"
_FORMATS = {
    "": JSON,
    "application/json": JSON,
    "text/plain": JSON,
    "application/x-ndjson": JSON_LINES,
    "application/jsonl": JSON_LINES,
    "application/json-lines": JSON_LINES,
    "application/jsonlines": JSON_LINES,
}
_raw_list = msgspec.json.Decoder(list[msgspec.Raw])


def body_format(content_type: str | None) -> str:
    """:data:`JSON` or :data:`JSON_LINES` from a Content-Type header, else 415."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    found = _FORMATS.get(media)
    if found is None:
        raise RequestRefused(
            415,
            "unsupported_media_type",
            f"{media!r}: send application/json or application/x-ndjson",
        )
    return found


def split_body(body: bytes, fmt: str, max_events: int) -> list[bytes] | Rejection:
    """The events of a body, each as the exact bytes sent, or why the body cannot be split.

    A JSON body starting with ``[`` is a batch; anything else is one event (its
    own verdict then says what is wrong with it). Raises :class:`RequestRefused`
    for an empty body or batch (400) and for more than ``max_events`` (413).
    """
    if fmt == JSON_LINES:
        events = [line for line in (raw.strip() for raw in body.split(b"\n")) if line]
    elif not body.strip():
        events = []
    elif body.lstrip()[:1] != b"[":
        events = [body]
    else:
        try:
            events = [bytes(raw) for raw in _raw_list.decode(body)]
        except RecursionError:
            return Rejection("too_deeply_nested", "JSON nesting exceeds the decoder's depth limit")
        except (msgspec.DecodeError, UnicodeDecodeError) as exc:
            # Same reason codes as ingest gives a message that does not parse.
            return _classify_decode_error(body, exc)
    if not events:
        raise RequestRefused(400, "empty_batch", "the body holds no event")
    if len(events) > max_events:
        raise RequestRefused(
            413, "too_many_events", f"{len(events)} events; at most {max_events} per request"
        )
    return events


async def read_body(request: web.BaseRequest, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(chunks)
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)


def _too_large(limit: int) -> RequestRefused:
    return RequestRefused(413, "body_too_large", f"the body exceeds {limit} bytes")


# ---------------------------------------------------------------- verdicts
@dataclass(frozen=True, slots=True)
class Verdict:
    """One input's outcome: accepted (``rejection`` None) for ``topic`` with ``key``."""

    index: int
    payload: bytes
    topic: str
    source: str
    rejection: Rejection | None = None
    key: bytes | None = None
    event_id: str | None = None

    def result(self) -> dict[str, Any]:
        if self.rejection is None:
            return {"index": self.index, "status": "accepted", "event_id": self.event_id}
        return {
            "index": self.index,
            "status": "rejected",
            "reason": self.rejection.reason,
            "detail": self.rejection.detail,
            "path": self.rejection.path,
        }


def source_for(channel: Any) -> str:
    """The raw-topic source of a channel, by the producer's rule (web when unknown)."""
    return SOURCE_OF_CHANNEL.get(channel, "web") if isinstance(channel, str) else "web"


def _guess_channel(payload: bytes) -> Any:
    """The channel of an invalid event if it can be read at all (to name the intended topic)."""
    try:
        doc = jsonio.loads(payload)
    except Exception:
        return None
    return doc.get("channel") if isinstance(doc, dict) else None


def judge(
    decoder: EventDecoder, payloads: Sequence[bytes], topics: TopicSettings, source: str | None
) -> list[Verdict]:
    """Validate each payload exactly as ingest does and name the topic it belongs on."""
    verdicts = []
    for index, payload in enumerate(payloads):
        result = decoder.validate(payload)
        if isinstance(result, Rejection):
            target = source or source_for(_guess_channel(payload))
            verdicts.append(Verdict(index, payload, topics.raw(target), target, result))
            continue
        event, _ts = result
        target = source or source_for(event.channel)
        if target not in topics.sources:
            rejection = Rejection(
                "invalid_value",
                f"channel {event.channel!r} belongs to source {target!r}, which has no raw "
                f"topic here; post to /v1/events/<source> (one of {', '.join(topics.sources)})",
                "$.channel",
            )
            verdicts.append(Verdict(index, payload, topics.raw(target), target, rejection))
            continue
        customer = event.customer_id
        key = customer if customer is not UNSET else event.anonymous_id
        verdicts.append(
            Verdict(
                index,
                payload,
                topics.raw(target),
                target,
                key=key.encode(),
                event_id=event.event_id,
            )
        )
    return verdicts


def status_of(verdicts: Sequence[Verdict]) -> int:
    """200 when every event was accepted, 400 when none was, 207 (multi-status) otherwise."""
    accepted = sum(1 for v in verdicts if v.rejection is None)
    if accepted == len(verdicts):
        return 200
    return 400 if accepted == 0 else 207


# ---------------------------------------------------------------- CORS
CORS_ALLOW_METHODS = "POST, OPTIONS"
CORS_ALLOW_HEADERS = "Authorization, Content-Type"
CORS_MAX_AGE_S = 600


def cors_headers(
    origin: str | None, allowed: Sequence[str], *, preflight: bool = False
) -> dict[str, str] | None:
    """CORS headers for an allowed ``origin``, or None (no headers) for any other."""
    if not origin or not allowed:
        return None
    if "*" in allowed:
        allow = "*"
    elif origin in allowed:
        allow = origin
    else:
        return None
    headers = {"Access-Control-Allow-Origin": allow, "Vary": "Origin"}
    if preflight:
        headers["Access-Control-Allow-Methods"] = CORS_ALLOW_METHODS
        headers["Access-Control-Allow-Headers"] = CORS_ALLOW_HEADERS
        headers["Access-Control-Max-Age"] = str(CORS_MAX_AGE_S)
    else:
        headers["Access-Control-Expose-Headers"] = "Retry-After"
    return headers


# ---------------------------------------------------------------- publishing
def _settle(future: asyncio.Future[str | None], error: str | None) -> None:
    if not future.done():
        future.set_result(error)


def _on_delivery(
    loop: asyncio.AbstractEventLoop,
    future: asyncio.Future[str | None],
    err: KafkaError | None,
    _msg: Message,
) -> None:
    # RuntimeError: the loop is closed, nobody waits for this answer any more.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(_settle, future, None if err is None else str(err))


class Publisher:
    """confluent-kafka with the producer's config, awaited per message from asyncio.

    A thread serves delivery callbacks; :meth:`publish` returns when the
    broker confirmed every message, or an error text.

    Like the other producers (:class:`touchpoint.producer.StallWatch`), the
    publisher replaces its client when it can no longer deliver: after a
    fatal error of the idempotent producer, or when it delivered nothing for
    ``stall_after_s`` while the broker answers (a broker that lost its
    producer-id state, e.g. restarted with memory storage, which librdkafka
    would retry forever). The requests waiting on the old client get an error
    (HTTP 503: the sender retries; event ids make a retry harmless).
    """

    def __init__(self, kafka: KafkaSettings, timeout_s: float, stall_after_s: float = 15.0) -> None:
        self.timeout_s = timeout_s
        self._config = producer_config(
            kafka,
            **{"message.timeout.ms": int(timeout_s * 1000), "error_cb": self._on_error},
            **broker_health(kafka, "collector"),
        )
        self._producer = Producer(self._config)
        self._watch = StallWatch(stall_after_s)
        self._fatal = False
        self.renewed = 0  # times the client was replaced
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="collector-delivery", daemon=True)
        self._thread.start()

    def _on_error(self, err: KafkaError) -> None:
        if err.fatal():
            self._fatal = True  # this client takes nothing more: the delivery thread replaces it
            log.error("collector producer fatal error, replacing the client: %s", err)
        elif err.code() == KafkaError._ALL_BROKERS_DOWN:
            log.warning("collector producer: %s", err)

    def _serve(self) -> None:
        while not self._stop.is_set():
            self._producer.poll(0.05)
            if self._fatal or self._watch.stalled(self._producer):
                self._renew()

    def _renew(self) -> None:
        why = (
            "a fatal error"
            if self._fatal
            else f"{self._watch.after_s:.0f} s without a delivery while the broker answers"
        )
        old, self._producer = self._producer, Producer(self._config)
        self._fatal = False
        self._watch.progress()
        self.renewed += 1
        log.warning("collector producer: new client after %s", why)
        retire(old, "collector producer", 5.0)  # the waiting requests get an error

    def _delivered(
        self,
        loop: asyncio.AbstractEventLoop,
        future: asyncio.Future[str | None],
        err: KafkaError | None,
        msg: Message,
    ) -> None:
        if err is None:
            self._watch.progress()
        _on_delivery(loop, future, err, msg)

    def check_topics(self, names: Sequence[str]) -> None:
        for name in names:
            partition_count(self._producer, name)  # ConfigError when missing

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    async def publish(self, messages: Sequence[tuple[str, bytes | None, bytes]]) -> str | None:
        """Write ``(topic, key, value)`` messages; None once all are delivered, else why not."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[str | None]] = []
        for topic, key, value in messages:
            future: asyncio.Future[str | None] = loop.create_future()
            callback = functools.partial(self._delivered, loop, future)
            while True:
                try:
                    self._producer.produce(topic, value, key=key, on_delivery=callback)
                    break
                except BufferError:
                    await asyncio.sleep(0.01)
                except KafkaException as exc:
                    future.set_result(str(exc.args[0]))
                    break
            futures.append(future)
        try:
            outcomes = await asyncio.wait_for(asyncio.gather(*futures), self.timeout_s + 1)
        except TimeoutError:
            return f"delivery not confirmed within {self.timeout_s} s"
        return next((error for error in outcomes if error is not None), None)

    def close(self, timeout: float = 10.0) -> int:
        """Flush, stop the callback thread; returns the number of undelivered messages."""
        remaining = int(self._producer.flush(timeout))
        self._stop.set()
        self._thread.join(timeout)
        return remaining


# ---------------------------------------------------------------- the service
class Collector:
    """The collector's logic around one :class:`Publisher`; :func:`create_app` serves it."""

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: TopicSettings,
        settings: CollectorSettings,
        ingest: IngestSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        ingest = ingest or IngestSettings()
        self.kafka = kafka
        self.topics = topics
        self.settings = settings
        self.clock = clock
        self.decoder = EventDecoder(
            max_payload_bytes=ingest.max_payload_bytes,
            min_event_time_ms=ingest.min_event_time_ms,
            max_future_skew_s=ingest.max_future_skew_s,
            clock=clock,
        )
        self.deadletter_payload_max_bytes = ingest.deadletter_payload_max_bytes
        self.auth = Authenticator(settings.token_list(), allow_anonymous=settings.allow_anonymous)
        self.limiter = RateLimiter(settings.rate_limit_per_s, settings.rate_limit_burst)
        self.publisher: Publisher | None = None

    def start(self) -> None:
        publisher = Publisher(self.kafka, self.settings.delivery_timeout_s)
        try:
            publisher.check_topics([*self.topics.raw_topics, self.topics.deadletter])
        except BaseException:
            publisher.close(0)
            raise
        self.publisher = publisher
        fingerprints = [fingerprint(t) for t in self.settings.token_list()]
        log.info(
            "collector: %s; raw topics %s",
            f"{len(fingerprints)} token(s) {', '.join(fingerprints)}"
            if fingerprints
            else "ANONYMOUS posts allowed",
            ", ".join(self.topics.raw_topics),
        )

    def stop(self) -> None:
        if self.publisher is not None:
            undelivered = self.publisher.close()
            if undelivered:
                log.warning("collector: %d messages undelivered at shutdown", undelivered)
            self.publisher = None

    def _dead_letter(self, rejection: Rejection, payload: bytes, topic: str) -> bytes:
        record = deadletter.dead_letter(
            rejection,
            payload=payload,
            topic=topic,
            stage=STAGE,
            max_payload_bytes=self.deadletter_payload_max_bytes,
            now_ms=int(self.clock() * 1000),
        )
        return deadletter.encode(record)

    async def _deliver(self, messages: list[tuple[str, bytes | None, bytes]]) -> None:
        assert self.publisher is not None, "Collector.start() was not called"
        error = await self.publisher.publish(messages)
        if error is not None:
            DELIVERY_FAILURES.inc()
            log.warning("collector: delivery failed: %s", error)
            raise RequestRefused(
                503,
                "broker_unavailable",
                "the events could not be stored; retry later (duplicates are deduplicated by event_id)",
                {"Retry-After": "1"},
            )

    async def post_events(self, request: web.Request) -> web.Response:
        principal = self.auth.check(request.headers.get("Authorization"), request.remote)
        source = request.match_info.get("source")
        if source is not None and source not in self.topics.sources:
            raise RequestRefused(
                404, "unknown_source", f"{source!r}; configured: {', '.join(self.topics.sources)}"
            )
        fmt = body_format(request.headers.get("Content-Type"))
        body = await read_body(request, self.settings.max_body_bytes)
        split = split_body(body, fmt, self.settings.max_batch_events)
        cost = 1 if isinstance(split, Rejection) else len(split)
        wait = self.limiter.acquire(principal.key, cost)
        if wait > 0:
            RATE_LIMITED.inc()
            retry_after = max(1, math.ceil(wait))
            raise RequestRefused(
                429,
                "rate_limited",
                f"over {self.settings.rate_limit_per_s:g} events/s; retry in {retry_after} s",
                {"Retry-After": str(retry_after)},
            )
        if isinstance(split, Rejection):
            target = source or "web"
            topic = self.topics.raw(target)
            await self._deliver(
                [(self.topics.deadletter, None, self._dead_letter(split, body, topic))]
            )
            EVENTS_REJECTED.labels(target, split.reason).inc()
            log.debug("collector: %s posted an unparseable body: %s", principal.name, split.reason)
            return _json(
                400,
                {"error": split.reason, "detail": split.detail, "dead_lettered": True},
            )
        verdicts = judge(self.decoder, split, self.topics, source)
        messages = [
            (v.topic, v.key, v.payload)
            if v.rejection is None
            else (self.topics.deadletter, None, self._dead_letter(v.rejection, v.payload, v.topic))
            for v in verdicts
        ]
        await self._deliver(messages)
        accepted = 0
        for v in verdicts:
            if v.rejection is None:
                accepted += 1
                EVENTS_ACCEPTED.labels(v.source).inc()
            else:
                EVENTS_REJECTED.labels(v.source, v.rejection.reason).inc()
        log.debug(
            "collector: %s posted %d events, %d rejected",
            principal.name,
            len(verdicts),
            len(verdicts) - accepted,
        )
        return _json(
            status_of(verdicts),
            {
                "accepted": accepted,
                "rejected": len(verdicts) - accepted,
                "results": [v.result() for v in verdicts],
            },
        )

    async def preflight(self, request: web.Request) -> web.Response:
        headers = cors_headers(
            request.headers.get("Origin"), self.settings.cors_origins, preflight=True
        )
        if headers is None:
            raise RequestRefused(403, "origin_not_allowed", "this origin may not post events")
        return web.Response(status=204, headers=headers)

    async def health(self, _request: web.Request) -> web.Response:
        if self.publisher is None or not self.publisher.alive:
            return _json(503, {"status": "down"})
        return _json(200, {"status": "ok"})

    async def metrics(self, _request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(collector: Collector) -> web.Application:
    """The aiohttp application: routes, JSON errors, CORS; starts and stops the publisher."""
    origins = collector.settings.cors_origins

    @web.middleware
    async def errors_and_cors(
        request: web.Request, handler: Callable[[web.Request], Any]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        try:
            response = await handler(request)
        except RequestRefused as refused:
            response = _json(
                refused.status, {"error": refused.code, "detail": refused.detail}, refused.headers
            )
        except web.HTTPException as exc:  # unknown routes, wrong methods
            allow = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
            code = exc.reason.lower().replace(" ", "_")
            response = _json(exc.status, {"error": code, "detail": exc.reason}, allow)
        except Exception:
            log.exception("collector: unexpected error on %s %s", request.method, request.path)
            response = _json(500, {"error": "internal_error", "detail": "see the collector's log"})
        if request.method != "OPTIONS":
            headers = cors_headers(request.headers.get("Origin"), origins)
            if headers:
                response.headers.update(headers)
        if request.method == "POST":
            REQUEST_SECONDS.observe(time.perf_counter() - started)
        REQUESTS.labels(str(response.status)).inc()
        return response

    app = web.Application(
        middlewares=[errors_and_cors], client_max_size=collector.settings.max_body_bytes
    )
    for path in ("/v1/events", "/v1/events/{source}"):
        app.router.add_post(path, collector.post_events)
        app.router.add_route("OPTIONS", path, collector.preflight)
    app.router.add_get("/health", collector.health)
    app.router.add_get("/metrics", collector.metrics)

    async def on_startup(_app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, collector.start)

    async def on_cleanup(_app: web.Application) -> None:
        await asyncio.get_running_loop().run_in_executor(None, collector.stop)

    app.on_startup.append(on_startup)
    app.on_cleanup.append(on_cleanup)
    return app


def run(settings: Settings) -> None:
    """Serve the collector until SIGINT/SIGTERM (``touchpoint collector``)."""
    collector = Collector(settings.kafka, settings.topics, settings.collector, settings.ingest)
    host, port = settings.collector.host, settings.collector.port
    log.info("collector starting on http://%s:%d", host, port)
    web.run_app(create_app(collector), host=host, port=port, print=None, shutdown_timeout=10)
