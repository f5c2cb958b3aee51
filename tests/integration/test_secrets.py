"""Secrets never reach the logs of real processes (SPEC §10).

Real ``python -m touchpoint`` processes run with recognisable secrets in every
secret setting and their whole stdout/stderr is searched for them:

- ``ingest`` with SASL credentials (and a TLS key password): over
  SASL_PLAINTEXT against the test broker, which has no SASL, and over SASL_SSL
  with real certificate files against a peer that does not speak TLS;
  librdkafka logs the failed handshakes;
- ``worker`` on PLAINTEXT (the SASL and key passwords are set but unused) with
  a Redis ACL user and password that Redis refuses, so the Redis mirror logs
  its failures while the worker serves a live journey;
- ``journey --redis`` with the password inside the Redis URL (Redis refuses it:
  a traceback), and a command refused for incomplete SASL settings;
- ``collector`` with two tokens, posted to with a valid, a wrong and no token.

Each log must also show that the path carrying the secret really ran (a SASL
failure, "Redis unavailable", the token fingerprint...), so the test cannot
pass by logging nothing. Reprs and JSON dumps are in
tests/unit/test_config_security.py; the in-process collector logs in
tests/integration/test_collector.py.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import Any

import httpx

from tests.certs import make_certs
from tests.events import page_view
from tests.pipeline import Pipeline, wait_until
from touchpoint.broker import free_port
from touchpoint.collector import fingerprint
from touchpoint.config import KafkaSettings, RedisSettings, TopicSettings

TAG = uuid.uuid4().hex[:8]
SASL_PASSWORD = f"sasl-secret-{TAG}"
KEY_PASSWORD = f"key-secret-{TAG}"
REDIS_PASSWORD = f"redis-secret-{TAG}"
REDIS_URL_PASSWORD = f"redis-url-secret-{TAG}"
TOKEN = f"collector-token-{TAG}-a1"
OTHER_TOKEN = f"collector-token-{TAG}-b2"
WRONG_TOKEN = f"collector-token-{TAG}-a0"  # a near miss is secret-looking too
SECRETS = (SASL_PASSWORD, KEY_PASSWORD, REDIS_PASSWORD, REDIS_URL_PASSWORD, TOKEN, OTHER_TOKEN,
           WRONG_TOKEN)  # fmt: skip


class Process:
    """``python -m touchpoint <args>`` with its stdout and stderr in one log file."""

    def __init__(self, env: dict[str, str], log: Path, *args: str) -> None:
        self.log = log
        self.process = subprocess.Popen(
            [sys.executable, "-m", "touchpoint", "--log-level", "debug", *args],
            env=env,
            stdout=log.open("ab"),
            stderr=subprocess.STDOUT,
        )

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, *needles: str, timeout: float = 90) -> None:
        wait_until(lambda: all(n in self.text() for n in needles), timeout, 0.5)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)


def base_env(kafka: KafkaSettings, topics: TopicSettings) -> dict[str, str]:
    return {
        **os.environ,
        "TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS": kafka.bootstrap_servers,
        "TOUCHPOINT_KAFKA_SESSION_TIMEOUT_MS": str(kafka.session_timeout_ms),
        "TOUCHPOINT_TOPICS_PREFIX": topics.prefix,
        "TOUCHPOINT_TOPICS_PARTITIONS": str(topics.partitions),
        # Set everywhere, used only where the protocol needs them.
        "TOUCHPOINT_KAFKA_SASL_USERNAME": "touchpoint-user",
        "TOUCHPOINT_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
        "TOUCHPOINT_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
        "TOUCHPOINT_COLLECTOR_TOKENS": f"{TOKEN},{OTHER_TOKEN}",
    }


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "touchpoint", "--log-level", "debug", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_secrets_are_never_logged(
    kafka: KafkaSettings,
    topics: TopicSettings,
    redis_settings: RedisSettings,
    unique: str,
    tmp_path: Path,
) -> None:
    certs = make_certs(tmp_path, KEY_PASSWORD)
    pipeline = Pipeline(kafka, topics, redis_settings, unique, tmp_path)
    not_tls = NotTls()
    env = base_env(kafka, topics)
    processes: list[Process] = []
    outputs: dict[str, str] = {}
    try:
        # ingest over SASL (plain text and TLS) to a broker without SASL.
        sasl = {"TOUCHPOINT_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
                "TOUCHPOINT_INGEST_GROUP_ID": f"t{unique}-sasl"}  # fmt: skip
        sasl_plain = Process(
            {**env, **sasl, "TOUCHPOINT_KAFKA_SECURITY_PROTOCOL": "SASL_PLAINTEXT"},
            tmp_path / "ingest-sasl-plaintext.log",
            "ingest",
        )
        sasl_ssl = Process(
            {
                **env,
                **sasl,
                "TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS": not_tls.address,
                "TOUCHPOINT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
                "TOUCHPOINT_KAFKA_SSL_CAFILE": certs["ca.pem"],
                "TOUCHPOINT_KAFKA_SSL_CERTFILE": certs["client.pem"],
                "TOUCHPOINT_KAFKA_SSL_KEYFILE": certs["client.key"],
            },
            tmp_path / "ingest-sasl-ssl.log",
            "ingest",
        )
        processes += [sasl_plain, sasl_ssl]

        # The collector with two tokens.
        port = free_port()
        collector = Process(
            env, tmp_path / "collector.log", "collector", "--host", "127.0.0.1", "--port", str(port)
        )
        processes.append(collector)

        # A worker whose Redis credentials are refused (the tests' Redis has no such user).
        pipeline.env.update(
            {
                "TOUCHPOINT_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
                "TOUCHPOINT_KAFKA_SASL_USERNAME": "touchpoint-user",
                "TOUCHPOINT_KAFKA_SASL_PASSWORD": SASL_PASSWORD,
                "TOUCHPOINT_REDIS_USERNAME": f"acl-{TAG}",
                "TOUCHPOINT_REDIS_PASSWORD": REDIS_PASSWORD,
            }
        )
        worker = pipeline.worker()
        worker.wait_ready()

        def post(token: str | None) -> int:
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            response = httpx.post(
                f"http://127.0.0.1:{port}/v1/events",
                json=page_view(f"sec-{token}", customer_id="cust-secret"),
                headers=headers,
                timeout=30,
            )
            return response.status_code

        wait_until(lambda: collector_health(port), 60)
        assert [post(TOKEN), post(WRONG_TOKEN), post(None), post(OTHER_TOKEN)] == [
            200,
            401,
            401,
            200,
        ]

        pipeline.send(page_view("sec-journey", customer_id="cust-secret"))

        def live() -> Any:
            try:
                status, body = worker.journey("cust-secret")
            except ValueError:  # not JSON: the lookup route is not up yet
                return None
            return status == 200 and body.get("live")

        wait_until(live, 60)
        wait_until(lambda: "Redis unavailable" in worker.log_path.read_text(errors="replace"))

        sasl_plain.wait_for("SASL", "handshake failed")
        sasl_ssl.wait_for("SSL handshake failed")
        collector.wait_for(fingerprint(TOKEN), fingerprint(OTHER_TOKEN), '"POST /v1/events')

        # Short-lived commands: the password inside the Redis URL, and refused settings.
        lookup = run(
            {**env, "TOUCHPOINT_REDIS_URL": f"redis://acl-{TAG}:{REDIS_URL_PASSWORD}@127.0.0.1:6379/0"},
            "journey", "cust-secret", "--redis",
        )  # fmt: skip
        assert lookup.returncode != 0 and "AuthenticationError" in lookup.stderr
        outputs["journey --redis"] = lookup.stdout + lookup.stderr
        refused = run(
            {**env, "TOUCHPOINT_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
             "TOUCHPOINT_KAFKA_SASL_USERNAME": "",
             "TOUCHPOINT_REDIS_URL": f"redis://:{REDIS_URL_PASSWORD}@h/0",
             "TOUCHPOINT_REDIS_PASSWORD": REDIS_PASSWORD},
            "ingest",
        )  # fmt: skip
        assert refused.returncode == 2 and "TOUCHPOINT_KAFKA" in refused.stderr
        outputs["ingest, refused settings"] = refused.stdout + refused.stderr
        refused_redis = run(
            {**env, "TOUCHPOINT_REDIS_URL": f"redis://:{REDIS_URL_PASSWORD}@h/0",
             "TOUCHPOINT_REDIS_PASSWORD": REDIS_PASSWORD},
            "journey", "cust-secret", "--redis",
        )  # fmt: skip
        assert refused_redis.returncode == 2 and "TOUCHPOINT_REDIS" in refused_redis.stderr
        outputs["journey, refused Redis settings"] = refused_redis.stdout + refused_redis.stderr
    finally:
        for process in processes:
            process.stop()
        pipeline.close()
        not_tls.close()
    for process in processes:
        outputs[process.log.name] = process.text()
    outputs["worker"] = worker.log_path.read_text(errors="replace")
    for name, text in outputs.items():
        assert text, name
        for secret in SECRETS:
            assert secret not in text, (name, secret)


class NotTls:
    """A TCP peer that answers a TLS handshake with plain text: handshakes fail at once."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"this is not TLS\r\n")

    def close(self) -> None:
        self.sock.close()


def collector_health(port: int) -> Any:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
