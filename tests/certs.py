"""Throwaway TLS files for tests: a CA, a client certificate it signed, an encrypted client key."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest


def make_certs(directory: Path, key_password: str) -> dict[str, str]:
    """Paths of ``ca.pem``, ``client.pem`` and ``client.key`` (encrypted with ``key_password``)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make test certificates")
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"]

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    openssl("req", "-x509", *ec, "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
            "-subj", "/CN=touchpoint-test-ca", "-days", "2")  # fmt: skip
    openssl("req", "-new", *ec, "-keyout", "client.key", "-passout", f"pass:{key_password}",
            "-out", "client.csr", "-subj", "/CN=touchpoint-client")  # fmt: skip
    openssl("x509", "-req", "-in", "client.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-out", "client.pem", "-days", "2")  # fmt: skip
    return {name: str(directory / name) for name in ("ca.pem", "client.pem", "client.key")}
