"""Security settings: every TOUCHPOINT_* variable reaches librdkafka, aiokafka (Faust) and redis-py.

Each test sets the environment as an operator would, reads the settings as the
commands do, and checks what the client libraries receive: the librdkafka
config dicts (producer, consumer, admin), Faust's broker credentials turned
into aiokafka's arguments by Faust's own driver function, and the connection
redis-py builds. Real certificate files (a throwaway CA, a client certificate
and a password-protected key, made with ``openssl``) prove the files and the
key password are actually loaded, not just copied into a dict. Secrets never
show in reprs, JSON dumps or configuration errors.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, KafkaException, Producer
from confluent_kafka.admin import AdminClient
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

from tests.certs import make_certs
from touchpoint.config import (
    CollectorSettings,
    KafkaSettings,
    RedisSettings,
    load,
)
from touchpoint.errors import ConfigError
from touchpoint.producer import producer_config

SASL_PASSWORD = "sasl-Pa55word-9f1c"
KEY_PASSWORD = "key-Pa55word-3d7e"
REDIS_PASSWORD = "redis-Pa55word-a41b"
TOKEN = "collector-token-5c0ffee5c0ffee"
SECRETS = (SASL_PASSWORD, KEY_PASSWORD, REDIS_PASSWORD, TOKEN)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return make_certs(tmp_path_factory.mktemp("certs"), KEY_PASSWORD)


def kafka_env(
    monkeypatch: pytest.MonkeyPatch, certs: dict[str, str], protocol: str, mechanism: str
) -> None:
    """Every Kafka security variable set, whatever the protocol uses of them."""
    for name, value in {
        "BOOTSTRAP_SERVERS": "127.0.0.1:1",
        "SECURITY_PROTOCOL": protocol,
        "SASL_MECHANISM": mechanism,
        "SASL_USERNAME": "touchpoint-user",
        "SASL_PASSWORD": SASL_PASSWORD,
        "SSL_CAFILE": certs["ca.pem"],
        "SSL_CERTFILE": certs["client.pem"],
        "SSL_KEYFILE": certs["client.key"],
        "SSL_KEY_PASSWORD": KEY_PASSWORD,
        "SSL_CHECK_HOSTNAME": "false",
    }.items():
        monkeypatch.setenv(f"TOUCHPOINT_KAFKA_{name}", value)


PROTOCOLS = ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
MECHANISMS = ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_kafka_variables_reach_librdkafka(
    monkeypatch: pytest.MonkeyPatch, certs: dict[str, str], protocol: str, mechanism: str
) -> None:
    kafka_env(monkeypatch, certs, protocol, mechanism)
    kafka = load(KafkaSettings)
    sasl = {
        "sasl.mechanism": mechanism,
        "sasl.username": "touchpoint-user",
        "sasl.password": SASL_PASSWORD,
    }
    tls = {
        "ssl.ca.location": certs["ca.pem"],
        "ssl.certificate.location": certs["client.pem"],
        "ssl.key.location": certs["client.key"],
        "ssl.key.password": KEY_PASSWORD,
        "ssl.endpoint.identification.algorithm": "none",
    }
    expected = {
        "bootstrap.servers": "127.0.0.1:1",
        "client.id": "touchpoint",
        "security.protocol": protocol.lower(),
        **(sasl if "SASL" in protocol else {}),
        **(tls if "SSL" in protocol else {}),
    }
    consumer_conf = kafka.librdkafka_consumer("g")
    producer_conf = producer_config(kafka)
    for conf in (kafka.librdkafka(), consumer_conf, producer_conf):
        security = {k: v for k, v in conf.items() if k.startswith(("sasl.", "ssl."))}
        assert security == {k: v for k, v in expected.items() if k.startswith(("sasl.", "ssl."))}
        assert {k: conf[k] for k in expected} == expected
    # librdkafka accepts every key and loads the files (the key with its password).
    Producer(producer_conf).flush(0)
    Consumer(consumer_conf).close()
    AdminClient(kafka.librdkafka())


def test_a_wrong_key_password_fails_in_librdkafka(
    monkeypatch: pytest.MonkeyPatch, certs: dict[str, str]
) -> None:
    """The key password is really used: with a wrong one librdkafka cannot load the key."""
    kafka_env(monkeypatch, certs, "SSL", "PLAIN")
    monkeypatch.setenv("TOUCHPOINT_KAFKA_SSL_KEY_PASSWORD", "wrong")
    with pytest.raises(KafkaException, match=r"ssl\.key\.location failed"):
        Producer(producer_config(load(KafkaSettings)))


@pytest.mark.parametrize("mechanism", MECHANISMS)
@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_kafka_variables_reach_faust_and_aiokafka(
    monkeypatch: pytest.MonkeyPatch, certs: dict[str, str], protocol: str, mechanism: str
) -> None:
    kafka_env(monkeypatch, certs, protocol, mechanism)
    monkeypatch.setenv("TOUCHPOINT_KAFKA_SSL_CHECK_HOSTNAME", "true")
    kafka = load(KafkaSettings)
    auth = credentials_to_aiokafka_auth(kafka.faust_credentials())
    assert auth["security_protocol"] == protocol
    if "SASL" in protocol:
        assert auth["sasl_mechanism"] == mechanism
        assert auth["sasl_plain_username"] == "touchpoint-user"
        assert auth["sasl_plain_password"] == SASL_PASSWORD
    else:
        assert not any(k.startswith("sasl") for k in auth)
    context = auth.get("ssl_context")
    if "SSL" not in protocol:
        assert context is None
        return
    assert isinstance(context, ssl.SSLContext)
    assert context.check_hostname is True and context.verify_mode == ssl.CERT_REQUIRED
    issuers = [dict(pair[0] for pair in ca["subject"]) for ca in context.get_ca_certs()]
    assert issuers == [{"commonName": "touchpoint-test-ca"}]


def test_aiokafka_context_follows_hostname_check_and_loads_the_client_key(
    monkeypatch: pytest.MonkeyPatch, certs: dict[str, str]
) -> None:
    kafka_env(monkeypatch, certs, "SSL", "PLAIN")  # SSL_CHECK_HOSTNAME=false
    context = load(KafkaSettings).ssl_context()
    assert context is not None and context.check_hostname is False
    assert context.verify_mode == ssl.CERT_REQUIRED  # the certificate is still verified
    monkeypatch.setenv("TOUCHPOINT_KAFKA_SSL_KEY_PASSWORD", "wrong")
    with pytest.raises(ssl.SSLError):
        load(KafkaSettings).ssl_context()


def test_sasl_needs_mechanism_username_and_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHPOINT_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("TOUCHPOINT_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    with pytest.raises(ConfigError) as refused:
        load(KafkaSettings)
    assert "TOUCHPOINT_KAFKA_SASL_MECHANISM" in str(refused.value) and SASL_PASSWORD not in str(
        refused.value
    )
    monkeypatch.setenv("TOUCHPOINT_KAFKA_SASL_MECHANISM", "GSSAPI")
    with pytest.raises(ConfigError, match="TOUCHPOINT_KAFKA_SASL_MECHANISM"):
        load(KafkaSettings)


# ---------------------------------------------------------------- Redis
def redis_connection(settings: RedisSettings) -> redis.connection.AbstractConnection:
    """The connection redis-py would open (nothing is connected)."""
    client = redis.Redis.from_url(settings.url, **settings.client_kwargs())
    return client.connection_pool.make_connection()


def test_redis_tls_and_acl_variables_reach_redis_py(
    monkeypatch: pytest.MonkeyPatch, certs: dict[str, str]
) -> None:
    for name, value in {
        "URL": "rediss://redis.internal:6380/2",
        "USERNAME": "touchpoint-acl",
        "PASSWORD": REDIS_PASSWORD,
        "SSL_CAFILE": certs["ca.pem"],
        "SSL_CERTFILE": certs["client.pem"],
        "SSL_KEYFILE": certs["client.key"],
        "SSL_KEY_PASSWORD": KEY_PASSWORD,
        "SSL_CHECK_HOSTNAME": "false",
    }.items():
        monkeypatch.setenv(f"TOUCHPOINT_REDIS_{name}", value)
    settings = load(RedisSettings)
    conn = redis_connection(settings)
    assert isinstance(conn, redis.connection.SSLConnection)
    assert (conn.host, conn.port, conn.db) == ("redis.internal", 6380, 2)
    assert (conn.username, conn.password) == ("touchpoint-acl", REDIS_PASSWORD)
    assert (conn.ca_certs, conn.certfile, conn.keyfile) == (
        certs["ca.pem"],
        certs["client.pem"],
        certs["client.key"],
    )
    assert conn.certificate_password == KEY_PASSWORD
    assert conn.check_hostname is False and conn.cert_reqs == ssl.CERT_REQUIRED
    monkeypatch.delenv("TOUCHPOINT_REDIS_SSL_CHECK_HOSTNAME")
    assert redis_connection(load(RedisSettings)).check_hostname is True


def test_redis_credentials_in_the_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHPOINT_REDIS_URL", f"redis://acl-user:{REDIS_PASSWORD}@10.0.0.5:6379/0")
    settings = load(RedisSettings)
    conn = redis_connection(settings)
    assert not isinstance(conn, redis.connection.SSLConnection)
    assert (conn.username, conn.password) == ("acl-user", REDIS_PASSWORD)
    assert settings.redacted_url == "redis://acl-user:**********@10.0.0.5:6379/0"


@pytest.mark.parametrize(
    ("env", "problem"),
    [
        ({"URL": "redis://h:6379/0", "SSL_CAFILE": "/ca.pem"}, "REDIS_SSL_CAFILE need a rediss://"),
        ({"URL": "redis://h/0", "SSL_KEY_PASSWORD": KEY_PASSWORD}, "need a rediss:// URL"),
        (
            {"URL": f"redis://:{REDIS_PASSWORD}@h/0", "PASSWORD": "other"},
            "both in TOUCHPOINT_REDIS_URL",
        ),
        ({"URL": "redis://u@h/0", "USERNAME": "v"}, "both in TOUCHPOINT_REDIS_URL"),
    ],
)
def test_redis_settings_that_redis_py_would_misread_are_refused(
    monkeypatch: pytest.MonkeyPatch, env: dict[str, str], problem: str
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(f"TOUCHPOINT_REDIS_{name}", value)
    with pytest.raises(ConfigError, match=problem) as refused:
        load(RedisSettings)
    assert not any(secret in str(refused.value) for secret in SECRETS)


# ---------------------------------------------------------------- masking
def test_settings_never_show_their_secrets(
    monkeypatch: pytest.MonkeyPatch, certs: dict[str, str]
) -> None:
    kafka_env(monkeypatch, certs, "SASL_SSL", "SCRAM-SHA-512")
    monkeypatch.setenv("TOUCHPOINT_REDIS_URL", f"rediss://u:{REDIS_PASSWORD}@h:6380/0")
    monkeypatch.setenv("TOUCHPOINT_REDIS_SSL_KEY_PASSWORD", KEY_PASSWORD)
    monkeypatch.setenv("TOUCHPOINT_COLLECTOR_TOKENS", f"{TOKEN},{TOKEN}-2")
    objects = [load(KafkaSettings), load(RedisSettings), load(CollectorSettings)]
    objects.append(load(KafkaSettings).faust_credentials())
    shown = [text for o in objects for text in (repr(o), str(o))]
    shown += [o.model_dump_json() for o in objects[:3]]  # type: ignore[attr-defined]
    for text in shown:
        for secret in SECRETS:
            assert secret not in text, text
    assert "**********" in shown[0] and "u:**********@h" in shown[2]
    # The secrets are there for the clients that need them.
    kafka, redis_settings, collector = objects[:3]
    assert kafka.librdkafka()["sasl.password"] == SASL_PASSWORD  # type: ignore[union-attr]
    assert redis_settings.client_kwargs()["ssl_password"] == KEY_PASSWORD  # type: ignore[union-attr]
    assert collector.token_list() == (TOKEN, f"{TOKEN}-2")  # type: ignore[union-attr]


def test_configuration_errors_do_not_echo_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOUCHPOINT_COLLECTOR_TOKENS", "short-secret-1")
    with pytest.raises(ConfigError) as refused:
        load(CollectorSettings)
    assert "TOUCHPOINT_COLLECTOR_TOKENS" in str(refused.value)
    assert "short-secret-1" not in str(refused.value)
    monkeypatch.setenv("TOUCHPOINT_KAFKA_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.setenv("TOUCHPOINT_KAFKA_SASL_MECHANISM", "PLAIN")
    monkeypatch.setenv("TOUCHPOINT_KAFKA_SASL_PASSWORD", SASL_PASSWORD)
    monkeypatch.setenv("TOUCHPOINT_KAFKA_SSL_KEY_PASSWORD", KEY_PASSWORD)
    with pytest.raises(ConfigError) as refused:
        load(KafkaSettings)  # no username
    assert SASL_PASSWORD not in str(refused.value) and KEY_PASSWORD not in str(refused.value)


def test_secret_paths_are_files_not_secrets(tmp_path: Path) -> None:
    """Paths are shown (they help operators); only passwords and tokens are masked."""
    kafka = KafkaSettings(security_protocol="SSL", ssl_cafile=str(tmp_path / "ca.pem"))
    assert str(tmp_path / "ca.pem") in repr(kafka)
