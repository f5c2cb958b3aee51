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
from pathlib import Path

import pytest

from touchpoint.config import RedisSettings
from touchpoint.demo_view import STAGES

ROOT = Path(__file__).resolve().parents[2]
METRICS_URL = re.compile(r"^metrics\s+(http://\S+/metrics) \(worker\)", re.M)
FIRING = re.compile(r"^\s+FIRING\s+payment_failure / ", re.M)


class Output:
    """Collects a process's output lines from a reader thread."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(process,), daemon=True)
        self._thread.start()

    def _read(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(list(self.lines))

    def close(self) -> None:
        self._thread.join(10)


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


@pytest.mark.timeout(240)
def test_the_demo_runs_everything_shows_the_outage_and_stops_cleanly(
    redis_settings: RedisSettings,
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOUCHPOINT_")}
    env["TOUCHPOINT_REDIS_URL"] = redis_settings.url
    env["TOUCHPOINT_REDIS_KEY_PREFIX"] = redis_settings.key_prefix
    # The outage starts once the 30 s spike warm-up is over; --duration only bounds a hang.
    args = ["--rate", "400", "--seed", "7", "--incident-at", "45", "--incident-for", "60"]
    process = subprocess.Popen(
        [sys.executable, "-m", "touchpoint", "demo", *args, "--duration", "200", "--interval", "2"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output = Output(process)
    spawned: dict[int, str] = {}
    metrics = ""
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and process.poll() is None:
            spawned.update(children(process.pid))
            found = METRICS_URL.search(output.text)
            if found and not served(metrics):
                try:
                    with urllib.request.urlopen(found.group(1), timeout=5) as response:
                        metrics = response.read().decode()
                except OSError:
                    pass
            if FIRING.search(output.text) and served(metrics):
                break
            time.sleep(1)
        assert process.poll() is None, output.text
        text = output.text
        assert FIRING.search(text), text
        assert served(metrics), metrics
        # The embedded broker and the worker, as children of the demo.
        assert any("tansu" in cmd for cmd in spawned.values()), spawned
        assert any(cmd.endswith(" worker ") for cmd in spawned.values()), spawned
        process.send_signal(signal.SIGINT)
        process.wait(90)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        output.close()
        left = {pid: cmd for pid, cmd in spawned.items() if alive(pid, cmd)}
        for pid in left:
            os.kill(pid, signal.SIGKILL)
    text = output.text
    assert process.returncode == 0, text
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
