"""The ``touchpoint`` command line.

Every command reads its settings from the environment (``TOUCHPOINT_*``, see
:mod:`touchpoint.config`); options override the few things one changes per run.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
from collections.abc import Iterator
from typing import IO, Any

import click

from touchpoint import gc_tuning, jsonio
from touchpoint.config import Settings
from touchpoint.errors import TouchpointError

log = logging.getLogger("touchpoint")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # One line per HTTP request (lookups, the demo's polling) is noise.
    logging.getLogger("httpx").setLevel(logging.WARNING)


class _Group(click.Group):
    """Turns TouchpointError (bad config, missing topics...) into one clear line and exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except TouchpointError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(2)


@click.group(cls=_Group)
@click.option(
    "--log-level",
    default="info",
    show_default=True,
    type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
)
@click.pass_context
def main(ctx: click.Context, log_level: str) -> None:
    """Touchpoint: live customer journeys, friction signals and spike alerts on Kafka."""
    _setup_logging(log_level)
    ctx.obj = Settings()


# ---------------------------------------------------------------- topics
@main.group()
def topics() -> None:
    """Create and list Touchpoint's topics."""


@topics.command("create")
@click.pass_obj
def topics_create(settings: Settings) -> None:
    """Create every topic with its partitions and configs (existing ones are kept)."""
    from confluent_kafka import KafkaException

    from touchpoint.topics import ensure_topics

    try:
        outcome = ensure_topics(settings.kafka, settings.topics)
    except KafkaException as exc:
        raise click.ClickException(
            f"cannot create topics on Kafka at {settings.kafka.bootstrap_servers}: {exc}"
        ) from exc
    for name, state in outcome.items():
        click.echo(f"{state:8} {name}")


@topics.command("list")
@click.pass_obj
def topics_list(settings: Settings) -> None:
    """Show the topics Touchpoint uses, with partitions, configs and purpose."""
    from touchpoint.topics import topic_specs

    for spec in topic_specs(settings.topics):
        configs = ",".join(f"{k}={v}" for k, v in sorted(spec.configs.items()))
        click.echo(f"{spec.name:40} {spec.partitions:3}  {configs:55} {spec.purpose}")


# ---------------------------------------------------------------- produce
def _lines(stream: IO[bytes]) -> Iterator[tuple[int, bytes]]:
    for number, line in enumerate(stream, 1):
        line = line.strip()
        if line:
            yield number, line


@main.command()
@click.argument("file", type=click.File("rb"), default="-")
@click.option("--source", help="Raw topic suffix to use for every event (default: by channel).")
@click.option(
    "--raw",
    is_flag=True,
    help="Send lines as they are, without validating (bad lines end in the dead-letter topic).",
)
@click.pass_obj
def produce(settings: Settings, file: IO[bytes], source: str | None, raw: bool) -> None:
    """Publish JSON Lines events from FILE (or stdin) to the raw topics.

    Events are validated first; invalid lines are reported on stderr with their
    line number and reason and not sent (exit status 1). Historical files are a
    supported backfill: journeys, signals and alerts follow event time.
    """
    from touchpoint.producer import TouchpointProducer

    sent = invalid = 0
    with TouchpointProducer(settings.kafka, settings.topics) as producer:
        for number, line in _lines(file):
            if raw:
                producer.send_raw(producer.topic_for(source or "web"), line)
                sent += 1
                continue
            rejection = producer.send(line, source)
            if rejection is None:
                sent += 1
            else:
                invalid += 1
                where = f" at {rejection.path}" if rejection.path else ""
                click.echo(
                    f"line {number}: {rejection.reason}{where}: {rejection.detail}", err=True
                )
        undelivered = producer.flush()
    click.echo(f"sent {sent - undelivered}, invalid {invalid}, undelivered {undelivered}", err=True)
    if invalid or undelivered:
        sys.exit(1)


# ---------------------------------------------------------------- ingest
@main.command()
@click.option("--metrics-port", type=int, help="Serve Prometheus metrics on this port.")
@click.pass_obj
def ingest(settings: Settings, metrics_port: int | None) -> None:
    """Run the ingest stage: raw topics -> validated bundles + dead letters."""
    from confluent_kafka import KafkaException

    from streams.ingest import IngestWorker
    from touchpoint.metrics import serve

    if metrics_port:
        serve(metrics_port, settings.metrics.host)
    try:
        worker = IngestWorker(settings.kafka, settings.topics, settings.ingest)
    except KafkaException as exc:
        # One clear line, not a traceback; the deployment restarts us.
        raise click.ClickException(
            f"cannot set up topics on Kafka at {settings.kafka.bootstrap_servers}: {exc}"
        ) from exc
    gc_tuning.tune()
    stop = threading.Event()
    try:
        worker.run(stop)
    except KeyboardInterrupt:
        stop.set()


# ---------------------------------------------------------------- collector
@main.command()
@click.option("--host", help="Interface to listen on (default: TOUCHPOINT_COLLECTOR_HOST).")
@click.option("--port", type=int, help="HTTP port (default: TOUCHPOINT_COLLECTOR_PORT, 8080).")
@click.pass_obj
def collector(settings: Settings, host: str | None, port: int | None) -> None:
    """Run the HTTP collector: browsers and apps POST events to the raw topics.

    Needs TOUCHPOINT_COLLECTOR_TOKENS (or TOUCHPOINT_COLLECTOR_ALLOW_ANONYMOUS=true).
    Serves /v1/events, /health and /metrics on one port.
    """
    from touchpoint.collector import run
    from touchpoint.topics import ensure_topics

    overrides = {k: v for k, v in {"host": host, "port": port}.items() if v is not None}
    # Read (and check) the collector settings before touching Kafka.
    settings.__dict__["collector"] = settings.collector.model_copy(update=overrides)
    ensure_topics(settings.kafka, settings.topics)
    run(settings)


# ---------------------------------------------------------------- worker
@main.command()
@click.option("--web-port", type=int, help="HTTP port for lookups and /metrics.")
@click.option("--store", help="Table store: rocksdb:// (default) or memory://.")
@click.pass_obj
def worker(settings: Settings, web_port: int | None, store: str | None) -> None:
    """Run a Faust worker: journeys, live lookups, Redis mirror (scale out by starting more)."""
    from faust.worker import Worker

    from streams.app import create_app
    from touchpoint.topics import ensure_topics

    overrides = {k: v for k, v in {"web_port": web_port, "store": store}.items() if v is not None}
    if overrides:
        settings.__dict__["worker"] = settings.worker.model_copy(update=overrides)
    ensure_topics(settings.kafka, settings.topics)
    app, _stage = create_app(settings)
    gc_tuning.tune()
    # -l info: at the default level Faust sets the root logger to DEBUG (FIELD-NOTES).
    Worker(app, loglevel="info").execute_from_commandline()


# ---------------------------------------------------------------- journey / forget
def _worker_url(settings: Settings, url: str | None) -> str:
    return (url or settings.worker.url).rstrip("/")


@main.command()
@click.argument("customer")
@click.option("--url", help="Any worker's URL (default: this host's worker settings).")
@click.option(
    "--redis", "from_redis", is_flag=True, help="Read the live journey from Redis instead."
)
@click.pass_obj
def journey(settings: Settings, customer: str, url: str | None, from_redis: bool) -> None:
    """Show a customer's live journey and recent history (from whichever worker owns it)."""
    import httpx

    if from_redis:
        import redis

        client = redis.Redis.from_url(settings.redis.url, **settings.redis.client_kwargs())
        value = client.get(f"{settings.redis.key_prefix}journey:{customer}")
        if value is None:
            click.echo(f"no live journey for {customer} in Redis", err=True)
            sys.exit(1)
        click.echo(jsonio.dumps_pretty(jsonio.loads(value)).decode())
        return
    response = httpx.get(f"{_worker_url(settings, url)}/journeys/{customer}/", timeout=10)
    if response.status_code == 404:
        click.echo(f"nothing kept for {customer}", err=True)
        sys.exit(1)
    response.raise_for_status()
    click.echo(jsonio.dumps_pretty(response.json()).decode())


@main.command()
@click.argument("customer")
@click.option(
    "--wait/--no-wait", default=True, show_default=True, help="Wait until the worker confirms."
)
@click.option("--url", help="Any worker's URL, to confirm the erasure.")
@click.option("--timeout", default=60.0, show_default=True)
@click.pass_obj
def forget(settings: Settings, customer: str, wait: bool, url: str | None, timeout: float) -> None:
    """Erase a customer (and stitched anonymous ids) from tables and Redis.

    The request travels on the validated stream to the partition that owns the
    customer, so it is applied in order with the customer's events, even by a
    worker that is down right now (once it is back).
    """
    from confluent_kafka import Producer

    from streams.bundles import Forget, Partitioner, encode_bundle
    from touchpoint.producer import producer_config
    from touchpoint.topics import partition_count

    producer = Producer(producer_config(settings.kafka))
    partitions = partition_count(producer, settings.topics.validated)
    partition = Partitioner(partitions)(customer)
    producer.produce(
        settings.topics.validated,
        encode_bundle([Forget(customer)], int(time.time() * 1000)),
        partition=partition,
    )
    if producer.flush(30):
        click.echo("error: the erasure request could not be delivered", err=True)
        sys.exit(2)
    click.echo(f"erasure of {customer} requested (partition {partition})", err=True)
    if not wait:
        return
    import httpx

    deadline = time.monotonic() + timeout
    endpoint = f"{_worker_url(settings, url)}/journeys/{customer}/"
    while time.monotonic() < deadline:
        try:
            if httpx.get(endpoint, timeout=5).status_code == 404:
                click.echo(f"{customer} forgotten", err=True)
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    click.echo(f"error: {customer} still readable after {timeout} s", err=True)
    sys.exit(1)


# ---------------------------------------------------------------- alerts
@main.group()
def alerts() -> None:
    """Spike alerts (the alerts topic)."""


@alerts.command("tail")
@click.option("--from-beginning", is_flag=True, help="Replay the topic from its start.")
@click.option(
    "--follow/--no-follow", default=True, show_default=True, help="Keep waiting for new alerts."
)
@click.option("--json", "as_json", is_flag=True, help="Print the records as JSON Lines.")
@click.pass_obj
def alerts_tail(settings: Settings, from_beginning: bool, follow: bool, as_json: bool) -> None:
    """Print alerts as they fire and resolve (Ctrl-C stops)."""
    from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, TopicPartition

    consumer = Consumer(
        {
            **settings.kafka.librdkafka(),
            "group.id": "touchpoint-alerts-tail",
            "enable.auto.commit": False,
        }
    )
    topic = settings.topics.alerts
    metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
    if metadata is None or metadata.error is not None:
        raise click.ClickException(f"topic {topic} does not exist; run `touchpoint topics create`")
    start = OFFSET_BEGINNING if from_beginning else OFFSET_END
    consumer.assign([TopicPartition(topic, p, start) for p in metadata.partitions])
    idle = 0.0
    try:
        while follow or idle < 2.0:
            message = consumer.poll(0.5)
            if message is None or message.error() is not None:
                idle += 0.5
                continue
            idle = 0.0
            try:
                record = jsonio.loads(message.value() or b"")
                line = (
                    jsonio.dumps(record).decode()
                    if as_json
                    else f"{record['window']['end']} "
                    f"{'FIRING  ' if record['state'] == 'firing' else 'resolved'} "
                    f"{record['alert_id']}  {record['description']}"
                )
            except (ValueError, KeyError, TypeError) as exc:
                # Not an alert record (a tombstone, or something another client
                # wrote): say so and go on; a tail must not die on one record.
                click.echo(
                    f"skipped a record that is not an alert at {message.topic()}"
                    f"[{message.partition()}]@{message.offset()}: {type(exc).__name__}",
                    err=True,
                )
                continue
            click.echo(line)
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()


# ---------------------------------------------------------------- simulate
@main.command()
@click.option("--rate", default=200.0, show_default=True, help="Events per second.")
@click.option("--duration", type=float, help="Seconds (of event time) to simulate.")
@click.option("--count", type=int, help="Number of events to simulate.")
@click.option("--seed", default=0, show_default=True)
@click.option("--customers", default=10_000, show_default=True)
@click.option(
    "--incident",
    "incidents",
    multiple=True,
    metavar="KIND@START+DURATION",
    help="e.g. payment_outage@60+120 (seconds after start). Repeatable.",
)
@click.option(
    "--start",
    help="Event time of the first event (RFC 3339 or epoch ms). Default: now.",
)
@click.option(
    "--output",
    type=click.File("wb"),
    help="Write JSON Lines here (no pacing) instead of publishing live to Kafka.",
)
@click.pass_obj
def simulate(
    settings: Settings,
    rate: float,
    duration: float | None,
    count: int | None,
    seed: int,
    customers: int,
    incidents: tuple[str, ...],
    start: str | None,
    output: IO[bytes] | None,
) -> None:
    """Simulate realistic multi-channel traffic, live to Kafka or to a file."""
    from schemas.decoder import parse_rfc3339
    from touchpoint.simulator import Incident, Simulator

    if start is None:
        start_ms = int(time.time() * 1000)
    elif start.isdigit():
        start_ms = int(start)
    else:
        parsed = parse_rfc3339(start)
        if parsed is None:
            raise click.BadParameter("not RFC 3339 or epoch ms", param_hint="--start")
        start_ms = parsed
    try:
        parsed_incidents = [Incident.parse(text) for text in incidents]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--incident") from None
    sim = Simulator(
        seed=seed, start_ms=start_ms, rate=rate, customers=customers, incidents=parsed_incidents
    )
    end_ms = start_ms + int(duration * 1000) if duration is not None else None
    if output is not None:
        if end_ms is None and count is None:
            raise click.UsageError("writing to a file needs --duration or --count")
        written = 0
        stream = sim.until(end_ms) if end_ms is not None else sim.events()
        for _source, event in stream:
            if count is not None and written >= count:
                break
            output.write(jsonio.dumps(event) + b"\n")
            written += 1
        click.echo(f"wrote {written} events", err=True)
        return
    from touchpoint.live import publish_live
    from touchpoint.producer import TouchpointProducer

    with (
        TouchpointProducer(settings.kafka, settings.topics) as producer,
        contextlib.suppress(KeyboardInterrupt),
    ):
        publish_live(sim, producer, end_ms=end_ms, count=count)
    click.echo(f"sent {producer.delivered} events", err=True)


# ---------------------------------------------------------------- broker
@main.command()
@click.option("--port", default=9092, show_default=True)
def broker(port: int) -> None:
    """Run the embedded Kafka-compatible broker (Tansu, in memory) in the foreground.

    Ctrl-C or SIGTERM stops Tansu too (exit status 0); if Tansu dies on its own
    the status is 1.
    """
    from touchpoint.broker import EmbeddedBroker
    from touchpoint.shutdown import stop_on_signals

    stop = threading.Event()
    with stop_on_signals(stop), EmbeddedBroker(port=port, die_with_parent=True) as running:
        click.echo(f"embedded broker listening on {running.bootstrap} (Ctrl-C stops it)")
        while running.running() and not stop.wait(0.5):
            pass
        crashed = not stop.is_set()
    if crashed:
        click.echo("error: the embedded broker stopped on its own", err=True)
        sys.exit(1)


# ---------------------------------------------------------------- demo
@main.command()
@click.option("--rate", default=300.0, show_default=True, help="Simulated events per second.")
@click.option(
    "--incident-at",
    default=60.0,
    show_default=True,
    help="Seconds until the payment-outage incident starts (negative: none).",
)
@click.option("--incident-for", default=120.0, show_default=True, help="Incident length, seconds.")
@click.option("--duration", type=float, help="Stop after this many seconds (default: Ctrl-C).")
@click.option(
    "--interval",
    default=10.0,
    show_default=True,
    help="Without a terminal: seconds between printed summaries.",
)
@click.option(
    "--bad-every",
    default=250,
    show_default=True,
    help="Inject one malformed input per N events (0: none).",
)
@click.option("--seed", type=int, help="Simulator seed (default: the clock).")
@click.pass_obj
def demo(
    settings: Settings,
    rate: float,
    incident_at: float,
    incident_for: float,
    duration: float | None,
    interval: float,
    bad_every: int,
    seed: int | None,
) -> None:
    """Run everything on one machine: broker, ingest, worker, simulator, live view.

    Starts the embedded broker (Tansu) unless TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS
    is set; uses Redis if it answers. On a terminal the view redraws in place;
    otherwise a summary is printed every --interval seconds. Ctrl-C or SIGTERM
    stops everything (exit status 0; 1 if part of the pipeline failed).
    """
    from touchpoint.demo import Demo

    status = Demo(
        settings,
        rate=rate,
        incident_at=incident_at if incident_at >= 0 else None,
        incident_for=incident_for,
        bad_every=bad_every,
        interval=interval,
        seed=seed,
    ).run(duration)
    sys.exit(status)


# ---------------------------------------------------------------- bench
@main.command()
@click.option("--events", default=200_000, show_default=True)
@click.option("--partitions", default=4, show_default=True)
@click.option("--json-out", type=click.Path(), help="Also write the figures as JSON here.")
@click.pass_obj
def bench(settings: Settings, events: int, partitions: int, json_out: str | None) -> None:
    """Benchmark: raw confluent-kafka ceiling vs the ingest stage, on the same data, in one run."""
    from touchpoint.bench import run_benchmark

    run_benchmark(settings, events=events, partitions=partitions, json_out=json_out)
