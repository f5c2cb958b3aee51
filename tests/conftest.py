"""Shared fixtures: one embedded broker (Tansu) per test session, the real Redis, unique names.

Unit tests (tests/unit) use none of these. Integration tests get a fresh topic
prefix and Redis key prefix each, so they never see each other's data.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from touchpoint.broker import EmbeddedBroker
from touchpoint.config import IngestSettings, KafkaSettings, RedisSettings, TopicSettings


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.path):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedBroker]:
    """A Tansu broker for the whole session (or TOUCHPOINT_TEST_BOOTSTRAP to use another)."""
    external = os.environ.get("TOUCHPOINT_TEST_BOOTSTRAP")
    if external:
        host, _, port = external.rpartition(":")
        yield EmbeddedBroker(port=int(port), host=host)
        return
    log = Path(tmp_path_factory.mktemp("broker")) / "tansu.log"
    with EmbeddedBroker(log_path=log) as started:
        yield started


@pytest.fixture
def kafka(broker: EmbeddedBroker) -> KafkaSettings:
    # 6 s session timeouts: Tansu holds JoinGroup for half the session timeout.
    return KafkaSettings(bootstrap_servers=broker.bootstrap, session_timeout_ms=6_000)


@pytest.fixture
def unique() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture
def topics(unique: str) -> TopicSettings:
    return TopicSettings(prefix=f"t{unique}.touchpoints", partitions=4)


@pytest.fixture
def ingest_settings(unique: str) -> IngestSettings:
    return IngestSettings(group_id=f"t{unique}-ingest", batch_timeout_s=0.2)


@pytest.fixture
def redis_settings(unique: str) -> Iterator[RedisSettings]:
    """The real Redis at 127.0.0.1:6379, isolated by a per-test key prefix (removed after)."""
    import redis

    settings = RedisSettings(key_prefix=f"test:{unique}:")
    client = redis.Redis.from_url(settings.url)
    client.ping()
    yield settings
    for key in client.scan_iter(match=f"{settings.key_prefix}*", count=1000):
        client.delete(key)
    client.close()
