"""The project's exceptions: one root, specific subclasses that carry data."""

from __future__ import annotations


class TouchpointError(Exception):
    """Root of every error Touchpoint raises on purpose."""


class ConfigError(TouchpointError):
    """A setting or config file is wrong; raised at start-up, never mid-stream."""

    def __init__(self, source: str, problems: list[str]) -> None:
        self.source = source
        self.problems = problems
        super().__init__(f"{source}: " + "; ".join(problems))


class SchemaError(TouchpointError):
    """A schema file is malformed or uses a JSON Schema feature the fast decoder cannot mirror."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}")


class BrokerError(TouchpointError):
    """The embedded broker could not be started or reached."""
