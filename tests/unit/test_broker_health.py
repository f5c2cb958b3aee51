"""touchpoint_kafka_up from librdkafka's statistics (the callback alone; the
integration test in test_ingest.py sees it set by real clients)."""

from __future__ import annotations

from prometheus_client import REGISTRY

from touchpoint import jsonio
from touchpoint.config import KafkaSettings
from touchpoint.producer import broker_health


def _value(client: str) -> float | None:
    return REGISTRY.get_sample_value("touchpoint_kafka_up", {"client": client})


def _stats(*states: str) -> str:
    brokers = {
        f"b{i}:9092/{i}": {"name": f"b{i}", "nodeid": i, "state": s} for i, s in enumerate(states)
    }
    return jsonio.dumps({"name": "rdkafka#producer-1", "brokers": brokers}).decode()


def test_kafka_up_follows_the_broker_states_in_librdkafka_statistics() -> None:
    config = broker_health(KafkaSettings(statistics_interval_ms=1_000), "unit_health")
    assert config["statistics.interval.ms"] == 1_000
    on_stats = config["stats_cb"]
    assert _value("unit_health") is None  # no series before the first report

    on_stats(_stats("UP", "DOWN"))
    assert _value("unit_health") == 1
    on_stats(_stats("DOWN", "TRY_CONNECT", "CONNECT"))
    assert _value("unit_health") == 0
    on_stats(_stats("INIT", "UP"))
    assert _value("unit_health") == 1
    on_stats(jsonio.dumps({"name": "x"}).decode())  # no brokers known: none is up
    assert _value("unit_health") == 0
    on_stats(_stats("UP"))
    on_stats("not json")  # ignored, the last reading stands
    on_stats("[1, 2]")
    assert _value("unit_health") == 1


# ---------------------------------------------------------------- the worker's Faust consumer
class _Conn:
    def __init__(self, up: bool) -> None:
        self.up = up

    def connected(self) -> bool:
        return self.up


def _app(consumer: object) -> object:
    """An object shaped like a Faust app whose consumer thread holds ``consumer``."""
    from types import SimpleNamespace

    return SimpleNamespace(consumer=SimpleNamespace(_thread=SimpleNamespace(_consumer=consumer)))


def _aiokafka(*ups: bool) -> object:
    from types import SimpleNamespace

    conns = {(i, 0): _Conn(up) for i, up in enumerate(ups)}
    return SimpleNamespace(_client=SimpleNamespace(_conns=conns))


def test_the_worker_consumer_is_up_while_one_aiokafka_connection_is() -> None:
    from streams.app import consumer_connected

    assert consumer_connected(_app(_aiokafka(False, True))) is True
    assert consumer_connected(_app(_aiokafka(False, False))) is False
    assert consumer_connected(_app(_aiokafka())) is False  # aiokafka dropped them all
    assert consumer_connected(_app(None)) is None  # not started: no reading
    assert consumer_connected(object()) is None  # other internals: no reading, never a 1
