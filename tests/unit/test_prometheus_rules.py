"""The Prometheus alerting rules in docker/ are valid and behave as their unit tests say."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

RULES = Path(__file__).resolve().parents[2] / "docker" / "prometheus"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: `make test` installs Debian's prometheus package"
)


@needs_promtool
def test_rules_are_valid() -> None:
    result = subprocess.run(
        [PROMTOOL, "check", "rules", str(RULES / "alerts.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rules_pass_their_unit_tests() -> None:
    result = subprocess.run(
        [PROMTOOL, "test", "rules", "alerts.test.yml"],
        cwd=RULES,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
