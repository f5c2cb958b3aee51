"""``touchpoint demo`` as a user runs it: one command, embedded broker, the local Redis.

The demo runs as a subprocess without TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS (so
it starts Tansu itself), with an early payment outage. Its plain-text
summaries (stdout is not a terminal) must show traffic, journeys by stage,
friction signals and the outage's alert; its metrics URL must answer while it
runs; Ctrl-C (SIGINT) must stop it with status 0 and leave no broker or worker
process behind.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest

from touchpoint.broker import EmbeddedBroker, wait_for_port
from touchpoint.config import RedisSettings
from touchpoint.demo_view import STAGES

ROOT = Path(__file__).resolve().parents[2]
METRICS_URL = re.compile(r"^metrics\s+(http://\S+/metrics) \(worker\)", re.M)
FIRING = re.compile(r"^\s+FIRING\s+payment_failure / ", re.M)


def children(pid: int) -> dict[int, str]:
    """Live child processes of ``pid`` (from /proc): pid -> command line."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        # Fields after the command name (which may hold spaces): state, ppid, ...
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state not in ("Z", "X"):
            found[int(entry.name)] = cmdline
    return found


def alive(pid: int, cmdline: str) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        now = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return False
    return now == cmdline and stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def served(metrics: str) -> bool:
    """The worker's metrics, once it has applied events and counted live journeys."""
    return "touchpoint_events_out_total{" in metrics and "touchpoint_journeys_active{" in metrics


def last_summary(text: str) -> str:
    blocks = text.split("\n---- +")
    assert len(blocks) > 1, text
    return blocks[-1]


def number(pattern: str, text: str) -> int:
    match = re.search(pattern, text, re.M)
    assert match is not None, f"{pattern!r} not in\n{text}"
    return int(match.group(1).replace(",", ""))


class RunningDemo:
    """``python -m touchpoint demo`` as a subprocess: its output and its child processes."""

    def __init__(self, env: dict[str, str], args: list[str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "touchpoint", "demo", *args],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.children: dict[int, str] = {}
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(list(self.lines))

    def wait_for(self, done: Callable[[], bool], timeout: float) -> None:
        """Poll ``done`` (noting the demo's children) until it holds; fail if the demo exits."""
        deadline = time.monotonic() + timeout
        while not done():
            self.children.update(children(self.process.pid))
            assert self.process.poll() is None, self.text
            assert time.monotonic() < deadline, self.text
            time.sleep(1)
        self.children.update(children(self.process.pid))

    def stop(self, sig: int) -> dict[int, str]:
        """Send ``sig``, wait for the exit; returns the children still alive (killed then)."""
        try:
            self.process.send_signal(sig)
            self.process.wait(90)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(10)
            self._reader.join(10)
            left = {pid: cmd for pid, cmd in self.children.items() if alive(pid, cmd)}
            for pid in left:
                os.kill(pid, signal.SIGKILL)
        return left


def demo_env(redis_settings: RedisSettings, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOUCHPOINT_")}
    env["TOUCHPOINT_REDIS_URL"] = redis_settings.url
    env["TOUCHPOINT_REDIS_KEY_PREFIX"] = redis_settings.key_prefix
    env.update({f"TOUCHPOINT_{key.upper()}": value for key, value in settings.items()})
    return env


def fetch(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except OSError:
        return ""


@pytest.mark.timeout(240)
def test_the_demo_runs_everything_shows_the_outage_and_stops_cleanly(
    redis_settings: RedisSettings,
) -> None:
    # The outage starts once the 30 s spike warm-up is over; --duration only bounds a hang.
    args = ["--rate", "400", "--seed", "7", "--incident-at", "45", "--incident-for", "60"]
    demo = RunningDemo(demo_env(redis_settings), [*args, "--duration", "200", "--interval", "2"])
    metrics = ""

    def outage_shown() -> bool:
        nonlocal metrics
        found = METRICS_URL.search(demo.text)
        if found and not served(metrics):
            metrics = fetch(found.group(1))
        return bool(FIRING.search(demo.text)) and served(metrics)

    try:
        demo.wait_for(outage_shown, timeout=180)
        # The embedded broker and the worker, as children of the demo.
        assert any("tansu" in cmd for cmd in demo.children.values()), demo.children
        assert any(cmd.endswith(" worker ") for cmd in demo.children.values()), demo.children
    finally:
        left = demo.stop(signal.SIGINT)
    text = demo.text
    assert demo.process.returncode == 0, text
    assert "Traceback" not in text, text
    assert left == {}, left
    assert "started the embedded broker (Tansu, in memory)" in text
    assert "demo stopped on a signal" in text

    summary = last_summary(text)
    assert number(r"^throughput\s+in ([\d,]+) events/s", summary) > 0
    assert number(r"applied ([\d,]+) events/s", summary) > 0
    stages = re.search(r"^  (awareness .*)$", summary, re.M)
    assert stages is not None, summary
    counts = dict(re.findall(r"(\w+) ([\d,]+)", stages.group(1)))
    assert set(STAGES) <= set(counts)
    assert sum(int(n.replace(",", "")) for n in counts.values()) > 0
    assert number(r"^  payment_failure\s+([\d,]+)\s", summary) > 0
    assert re.search(r"^incident\s+payment_outage: \+45 s to \+105 s", summary, re.M)
    assert re.search(r"^journey lookup http://\S+/journeys/", summary, re.M)


@pytest.mark.timeout(180)
def test_with_a_configured_kafka_the_demo_starts_no_broker_and_stops_on_sigterm(
    broker: EmbeddedBroker, redis_settings: RedisSettings, unique: str
) -> None:
    # The session's broker plays "your Kafka"; the settings are what a user would set.
    env = demo_env(
        redis_settings,
        kafka_bootstrap_servers=broker.bootstrap,
        kafka_session_timeout_ms="6000",
        topics_prefix=f"t{unique}.touchpoints",
        worker_app_id=f"t{unique}",
        ingest_group_id=f"t{unique}-ingest",
        worker_store="memory://",
        worker_changelog_single_record_batches="true",
    )
    demo = RunningDemo(env, ["--rate", "200", "--incident-at", "-1", "--interval", "2"])

    def applying() -> bool:
        blocks = demo.text.split("\n---- +")
        return len(blocks) > 2 and number(r"applied ([\d,]+) events/s", blocks[-2]) > 0

    try:
        demo.wait_for(applying, timeout=120)
        assert any(cmd.endswith(" worker ") for cmd in demo.children.values()), demo.children
        assert not any("tansu" in cmd for cmd in demo.children.values()), demo.children
    finally:
        left = demo.stop(signal.SIGTERM)
    text = demo.text
    assert demo.process.returncode == 0, text
    assert "Traceback" not in text, text
    assert left == {}, left
    assert f"using Kafka at {broker.bootstrap}: topics t{unique}.touchpoints.*" in text
    assert "started the embedded broker" not in text
    assert f"broker         Kafka at {broker.bootstrap} (from configuration)" in text
    assert not re.search(r"^incident", last_summary(text), re.M)  # --incident-at -1: none
    wait_for_port(broker.host, broker.port, timeout=5)  # not the demo's to stop
