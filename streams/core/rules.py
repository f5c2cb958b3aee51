"""Friction rules: declarative per-customer detectors (§6), pure.

Three kinds, configured in one TOML file (:file:`touchpoint/rules.toml` is the
default; see its header for the syntax):

- ``match``: one event matching a predicate raises a signal;
- ``threshold``: N matching events within a window (optionally per group,
  e.g. the same error code) raise one signal, then counting starts again;
- ``absence``: a start event not followed by an end event within a window (or
  before its journey closes) raises a signal, once per correlated value (one
  signal per cart).

Rule state lives in the customer's state (``CustomerState.rules``), so windows
longer than a journey (support contacts within 7 days) work and survive
restarts. Signal ids are derived from the rule, the customer and the evidence,
so a replay yields the same ids.
"""

from __future__ import annotations

import bisect
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xxhash import xxh3_128_hexdigest

from schemas.registry import uri_for
from streams.bundles import Event, Touchpoint, properties_of
from streams.core.clock import iso_ms
from streams.core.journey import CustomerState, Journey
from touchpoint.errors import ConfigError

FRICTION_SIGNAL = uri_for("friction_signal")
DEFAULT_RULES_FILE = Path(__file__).resolve().parents[2] / "touchpoint" / "rules.toml"
KINDS = ("match", "threshold", "absence")
SEVERITIES = ("low", "medium", "high")
MAX_FRICTION_PER_JOURNEY = 20
MAX_FIRED_PER_RULE = 20

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNIT_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


def parse_duration(text: Any, where: str) -> int:
    """``"90s"``, ``"30m"``, ``"1h"``, ``"7d"`` -> milliseconds."""
    match = _DURATION.match(str(text))
    if match is None:
        raise ConfigError(where, [f"not a duration: {text!r} (use e.g. 90s, 30m, 1h, 7d)"])
    return int(float(match.group(1)) * _UNIT_MS[match.group(2)])


# ------------------------------------------------------------------ predicates
Getter = Callable[[Event, dict[str, Any] | None], Any]
Predicate = Callable[[Event, dict[str, Any] | None], bool]
_MISSING = object()


def _getter(path: str, where: str) -> tuple[Getter, bool]:
    """A field reader and whether it needs the event's properties."""
    if not isinstance(path, str):
        raise ConfigError(
            where,
            [f"a field must be a string (event_type, channel, properties.<name>), not {path!r}"],
        )
    if path == "event_type":
        return (lambda e, _p: e.event_type), False
    if path == "channel":
        return (lambda e, _p: e.channel), False
    if path.startswith("properties.") and len(path) > len("properties."):
        name = path[len("properties.") :]
        return (lambda _e, p: p.get(name, _MISSING) if p is not None else _MISSING), True
    raise ConfigError(where, [f"unknown field {path!r} (event_type, channel, properties.<name>)"])


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_OPS: dict[str, Callable[[Any, Any], bool]] = {
    "eq": lambda v, x: v == x,
    "ne": lambda v, x: v != x,
    "in": lambda v, x: v in x,
    "not_in": lambda v, x: v not in x,
    "lt": lambda v, x: _number(v) and v < x,
    "le": lambda v, x: _number(v) and v <= x,
    "gt": lambda v, x: _number(v) and v > x,
    "ge": lambda v, x: _number(v) and v >= x,
    "prefix": lambda v, x: isinstance(v, str) and v.startswith(x),
    "exists": lambda v, x: (v is not _MISSING) == bool(x),
}


def _condition(
    path: str, spec: Any, where: str
) -> tuple[Predicate, bool, frozenset[str] | None, bool]:
    """(predicate, needs properties, event types it can match or None for any,
    whether the predicate is exactly "event_type in those types")."""
    get, needs_props = _getter(path, where)
    if isinstance(spec, dict):
        checks = []
        for op, operand in spec.items():
            if op not in _OPS:
                raise ConfigError(
                    where, [f"unknown operator {op!r} for {path} ({', '.join(_OPS)})"]
                )
            if op in ("in", "not_in") and not isinstance(operand, list):
                raise ConfigError(where, [f"{path}: {op} needs a list"])
            test = _OPS[op]
            value = frozenset(operand) if op in ("in", "not_in") else operand
            checks.append((test, value))

        if len(checks) == 1:
            [(test, value)] = checks

            def predicate(e: Event, p: dict[str, Any] | None) -> bool:
                return test(get(e, p), value)
        else:

            def predicate(e: Event, p: dict[str, Any] | None) -> bool:
                found = get(e, p)
                for test, value in checks:  # noqa: SIM110 - a loop: no generator per event
                    if not test(found, value):
                        return False
                return True

        types = None
        if path == "event_type" and set(spec) <= {"eq", "in"}:
            types = frozenset(spec.get("in", [])) | (
                frozenset([spec["eq"]]) if "eq" in spec else frozenset()
            )
        return predicate, needs_props, types, types is not None and len(spec) == 1
    if isinstance(spec, list):
        allowed = frozenset(spec)
        return (
            (lambda e, p: get(e, p) in allowed),
            needs_props,
            allowed if path == "event_type" else None,
            path == "event_type",
        )
    return (
        (lambda e, p: get(e, p) == spec),
        needs_props,
        frozenset([spec]) if path == "event_type" else None,
        path == "event_type",
    )


def _all_of(checks: list[Predicate]) -> Predicate:
    if len(checks) == 1:
        return checks[0]

    def predicate(e: Event, p: dict[str, Any] | None) -> bool:
        for check in checks:  # noqa: SIM110 - a loop: no generator per event
            if not check(e, p):
                return False
        return True

    return predicate


def _any_of(alternatives: list[Predicate]) -> Predicate:
    if len(alternatives) == 1:
        return alternatives[0]

    def predicate(e: Event, p: dict[str, Any] | None) -> bool:
        for alternative in alternatives:  # noqa: SIM110 - a loop: no generator per event
            if alternative(e, p):
                return True
        return False

    return predicate


@dataclass(frozen=True)
class Alternative:
    """One all-of condition set: its event types (None: any) and its other checks."""

    types: frozenset[str] | None
    checks: tuple[tuple[Predicate, bool], ...]  # (predicate, needs properties)


@dataclass(frozen=True)
class Matcher:
    """Any-of a list of all-of condition sets, with the event types it can match."""

    predicate: Predicate
    needs_properties: bool
    event_types: frozenset[str] | None  # None: any event type
    alternatives: tuple[Alternative, ...] = ()

    def __call__(self, event: Event, props: dict[str, Any] | None) -> bool:
        return self.predicate(event, props)

    def for_type(self, event_type: str) -> tuple[bool, Predicate | None, bool]:
        """Specialised to events of ``event_type``: (can match, predicate, needs properties).

        Conditions that only test the event type are settled here, so the
        predicate (None: always true) checks only what is left: most built-in
        rules need no check at all per event.
        """
        left: list[list[tuple[Predicate, bool]]] = []
        for alternative in self.alternatives:
            if alternative.types is not None and event_type not in alternative.types:
                continue
            if not alternative.checks:
                return True, None, False
            left.append(list(alternative.checks))
        if not left:
            return False, None, False
        predicate = _any_of([_all_of([c for c, _needs in checks]) for checks in left])
        return True, predicate, any(needs for checks in left for _c, needs in checks)


def compile_matcher(spec: Any, where: str) -> Matcher:
    alternatives = spec if isinstance(spec, list) else [spec]
    if not alternatives or not all(isinstance(a, dict) and a for a in alternatives):
        raise ConfigError(where, ["conditions must be a non-empty table or list of tables"])
    compiled = []
    specialised = []
    needs = False
    types: set[str] | None = set()
    for alternative in alternatives:
        checks = []
        rest: list[tuple[Predicate, bool]] = []
        alt_types: frozenset[str] | None = None
        for path, condition in alternative.items():
            predicate, needs_props, event_types, exact = _condition(path, condition, where)
            checks.append(predicate)
            if not exact:
                rest.append((predicate, needs_props))
            needs = needs or needs_props
            if event_types is not None:
                alt_types = event_types if alt_types is None else alt_types & event_types
        compiled.append(_all_of(checks))
        specialised.append(Alternative(alt_types, tuple(rest)))
        if types is not None:
            types = None if alt_types is None else types | alt_types

    return Matcher(
        _any_of(compiled),
        needs,
        frozenset(types) if types is not None else None,
        tuple(specialised),
    )


# ------------------------------------------------------------------ rules
@dataclass(frozen=True)
class Rule:
    name: str
    kind: str
    severity: str
    when: Matcher | None = None  # match, threshold
    start: Matcher | None = None  # absence
    end: Matcher | None = None  # absence
    count: int = 1
    within_ms: int = 0
    group_by: tuple[Getter, ...] = ()
    correlate: Getter | None = None
    on_journey_close: bool = False
    # group_by/correlate read event properties (decode them even if no condition does)
    reads_properties: bool = False

    def matchers(self) -> Iterable[tuple[str, Matcher]]:
        for role, matcher in (("when", self.when), ("start", self.start), ("end", self.end)):
            if matcher is not None:
                yield role, matcher


@dataclass(frozen=True)
class SpikeConfig:
    window_ms: int = 60_000
    threshold_sigma: float = 3.0
    min_count: int = 8
    warmup_windows: int = 10
    alpha: float = 0.1
    resolve_sigma: float = 1.5
    resolve_windows: int = 2
    cooldown_windows: int = 5
    lateness_ms: int = 60_000
    # Consecutive windows above the threshold needed to fire (like Prometheus `for:`).
    fire_windows: int = 2


@dataclass(frozen=True)
class RulesConfig:
    rules: tuple[Rule, ...]
    spikes: SpikeConfig = field(default_factory=SpikeConfig)
    source: str = "<defaults>"
    # Per-rule spike settings (a rule's `spike` table over [spikes]).
    spike_overrides: dict[str, SpikeConfig] = field(default_factory=dict)

    def spikes_for(self, rule: str) -> SpikeConfig:
        return self.spike_overrides.get(rule, self.spikes)


_RULE_KEYS = {
    "match": {"name", "kind", "severity", "when", "spike"},
    "threshold": {"name", "kind", "severity", "when", "count", "within", "group_by", "spike"},
    "absence": {
        "name", "kind", "severity", "start", "end", "within", "on_journey_close", "correlate",
        "spike",
    },
}  # fmt: skip
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


def _rule(raw: Any, index: int) -> Rule:
    where = f"rule #{index + 1}"
    if not isinstance(raw, dict):
        raise ConfigError(where, ["each [[rule]] must be a table"])
    name = raw.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(where, [f"name {name!r} must match {_NAME.pattern}"])
    where = f"rule {name!r}"
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(where, [f"kind {kind!r} must be one of {KINDS}"])
    unknown = set(raw) - _RULE_KEYS[kind]
    if unknown:
        raise ConfigError(where, [f"unknown keys for a {kind} rule: {sorted(unknown)}"])
    severity = raw.get("severity", "medium")
    if severity not in SEVERITIES:
        raise ConfigError(where, [f"severity {severity!r} must be one of {SEVERITIES}"])
    if kind == "match":
        if "when" not in raw:
            raise ConfigError(where, ["a match rule needs `when`"])
        return Rule(name, kind, severity, when=compile_matcher(raw["when"], where))
    if kind == "threshold":
        missing = {"when", "count", "within"} - set(raw)
        if missing:
            raise ConfigError(where, [f"a threshold rule needs {sorted(missing)}"])
        count = raw["count"]
        if not isinstance(count, int) or count < 1:
            raise ConfigError(where, ["count must be a positive integer"])
        group_by = raw.get("group_by", [])
        if not isinstance(group_by, list):
            raise ConfigError(where, ["group_by must be a list of fields"])
        readers = [_getter(path, where) for path in group_by]
        return Rule(
            name,
            kind,
            severity,
            when=compile_matcher(raw["when"], where),
            count=count,
            within_ms=parse_duration(raw["within"], where),
            group_by=tuple(getter for getter, _props in readers),
            reads_properties=any(props for _read, props in readers),
        )
    missing = {"start", "end", "within"} - set(raw)
    if missing:
        raise ConfigError(where, [f"an absence rule needs {sorted(missing)}"])
    correlate = raw.get("correlate")
    getter, reads_properties = _getter(correlate, where) if correlate is not None else (None, False)
    return Rule(
        name,
        kind,
        severity,
        start=compile_matcher(raw["start"], where),
        end=compile_matcher(raw["end"], where),
        within_ms=parse_duration(raw["within"], where),
        correlate=getter,
        on_journey_close=bool(raw.get("on_journey_close", False)),
        reads_properties=reads_properties,
    )


_SPIKE_KEYS = {
    "window", "threshold_sigma", "min_count", "warmup_windows", "alpha", "resolve_sigma",
    "resolve_windows", "cooldown_windows", "lateness", "fire_windows",
}  # fmt: skip


def _spikes(raw: Any, base: SpikeConfig | None = None, where: str = "[spikes]") -> SpikeConfig:
    """[spikes], or a rule's `spike` table on top of ``base`` (window and lateness are global)."""
    if not isinstance(raw, dict):
        raise ConfigError(where, ["must be a table"])
    known = _SPIKE_KEYS - ({"window", "lateness"} if base is not None else set())
    unknown = set(raw) - known
    if unknown:
        raise ConfigError(where, [f"unknown keys {sorted(unknown)}"])
    d = base or SpikeConfig()
    config = SpikeConfig(
        window_ms=parse_duration(raw["window"], where) if "window" in raw else d.window_ms,
        threshold_sigma=float(raw.get("threshold_sigma", d.threshold_sigma)),
        min_count=int(raw.get("min_count", d.min_count)),
        warmup_windows=int(raw.get("warmup_windows", d.warmup_windows)),
        alpha=float(raw.get("alpha", d.alpha)),
        resolve_sigma=float(raw.get("resolve_sigma", d.resolve_sigma)),
        resolve_windows=int(raw.get("resolve_windows", d.resolve_windows)),
        cooldown_windows=int(raw.get("cooldown_windows", d.cooldown_windows)),
        lateness_ms=parse_duration(raw["lateness"], where) if "lateness" in raw else d.lateness_ms,
        fire_windows=int(raw.get("fire_windows", d.fire_windows)),
    )
    problems = []
    if not 0 < config.alpha <= 1:
        problems.append("alpha must be in (0, 1]")
    if config.window_ms < 1000 or config.window_ms > 7 * 86_400_000:
        problems.append("window must be between 1s and 7d")
    if config.resolve_sigma > config.threshold_sigma:
        problems.append("resolve_sigma must not exceed threshold_sigma")
    if min(config.min_count, config.warmup_windows, config.resolve_windows) < 0:
        problems.append("counts must not be negative")
    if config.fire_windows < 1:
        problems.append("fire_windows must be at least 1")
    if problems:
        raise ConfigError(where, problems)
    return config


def load_rules(path: str | Path | None = None) -> RulesConfig:
    """Read and check a rules file (default: the built-in rules of §6)."""
    source = Path(path) if path else DEFAULT_RULES_FILE
    try:
        raw = tomllib.loads(source.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(str(source), [str(exc)]) from None
    unknown = set(raw) - {"rule", "spikes"}
    if unknown:
        raise ConfigError(str(source), [f"unknown sections {sorted(unknown)}"])
    try:
        rules = tuple(_rule(r, i) for i, r in enumerate(raw.get("rule", [])))
        spikes = _spikes(raw.get("spikes", {}))
        overrides = {
            r["name"]: _spikes(r["spike"], spikes, f"rule {r['name']!r} spike")
            for r in raw.get("rule", [])
            if isinstance(r, dict) and "spike" in r
        }
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc.source}", exc.problems) from None
    names = [r.name for r in rules]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(str(source), [f"duplicate rule names {duplicates}"])
    return RulesConfig(rules, spikes, str(source), overrides)


# ------------------------------------------------------------------ engine
def signal_id(rule: str, customer: str, *parts: str) -> str:
    """Stable id: the same rule, customer and evidence always give the same id."""
    return "fs-" + xxh3_128_hexdigest("\x1f".join((rule, customer, *parts)).encode())[:24]


class RuleEngine:
    """Evaluates the rules for one customer's touchpoints; results go to ``fx.signals``."""

    def __init__(self, config: RulesConfig) -> None:
        self.config = config
        self.rules = config.rules
        self.by_name = {r.name: r for r in self.rules}
        # event type -> [(rule, role, matcher)]; rules that can match any type go everywhere.
        self._any: list[tuple[Rule, str, Matcher]] = []
        self._by_type: dict[str, list[tuple[Rule, str, Matcher]]] = {}
        self._absence = tuple(r for r in self.rules if r.kind == "absence")
        self._threshold = tuple(r for r in self.rules if r.kind == "threshold")
        # event type -> (candidates, whether any of them reads properties), built on first use
        self._plans: dict[str, tuple[list[tuple[Rule, str, Predicate | None]], bool]] = {}
        # How far before an event's window threshold history must still be kept:
        # events up to this much older than the newest one can still arrive
        # (the sessionizer sets it to its grace; older events are late).
        self.history_slack_ms = 0
        for rule in self.rules:
            for role, matcher in rule.matchers():
                if matcher.event_types is None:
                    self._any.append((rule, role, matcher))
                else:
                    for etype in matcher.event_types:
                        self._by_type.setdefault(etype, []).append((rule, role, matcher))

    def candidates(self, event_type: str) -> list[tuple[Rule, str, Matcher]]:
        found = self._by_type.get(event_type)
        if not self._any:
            return found or []
        return (found or []) + self._any

    def _plan(self, event_type: str) -> tuple[list[tuple[Rule, str, Predicate | None]], bool]:
        """The rules an event of this type can trigger, with specialised predicates
        (None: matches every event of the type), and whether any reads properties."""
        plan = self._plans.get(event_type)
        if plan is None:
            steps: list[tuple[Rule, str, Predicate | None]] = []
            reads = False
            for rule, role, matcher in self.candidates(event_type):
                possible, predicate, needs = matcher.for_type(event_type)
                if possible:
                    steps.append((rule, role, predicate))
                    reads = reads or needs or rule.reads_properties
            plan = (steps, reads)
            if len(self._plans) < 10_000:  # event types are a small, closed set
                self._plans[event_type] = plan
        return plan

    def on_touchpoint(
        self, state: CustomerState, tp: Touchpoint, journey: Journey | None, fx: Any
    ) -> None:
        event = tp.event
        plan = self._plans.get(event.event_type)
        candidates, reads = plan if plan is not None else self._plan(event.event_type)
        if not candidates:
            return
        props = properties_of(event) if reads else None
        for rule, role, predicate in candidates:
            if predicate is not None and not predicate(event, props):
                continue
            kind = rule.kind
            if kind == "match":
                self._emit(
                    state, rule, journey, event.channel, tp.ts, [event.event_id], {}, fx,
                    signal_id(rule.name, state.key, event.event_id),
                )  # fmt: skip
            elif kind == "threshold":
                self._count(state, rule, tp, props, journey, fx)
            elif role == "start":
                self._open(state, rule, tp, props, journey)
            else:
                self._close(state, rule, event, props)

    def _count(
        self,
        state: CustomerState,
        rule: Rule,
        tp: Touchpoint,
        props: dict[str, Any] | None,
        journey: Journey | None,
        fx: Any,
    ) -> None:
        """Count one matching event in its group's window; fire at ``rule.count``.

        Each group keeps ``[ts, event id]`` pairs in time order, trimmed to the
        window ending at this event. Other groups of the customer whose newest
        entry is older than any event still to come can use (the window plus
        the sessionizer's grace: older events are late and never reach the
        rules) are dropped here too. Without that, a grouped rule (the error
        loop groups page views by url) kept one list per page visited until
        the journey closed: state that every flush encoded again.
        """
        event = tp.event
        ts = tp.ts
        group = "\x1f".join(
            [
                "" if (v := get(event, props)) is _MISSING or v is None else str(v)
                for get in rule.group_by
            ]
        )
        rules = state.rules
        groups = rules.get(rule.name)
        if groups is None:
            groups = rules[rule.name] = {}
        entry: list[Any] = [ts, event.event_id]
        seen = groups.get(group)
        if seen is None:
            seen = groups[group] = [entry]
        elif entry >= seen[-1]:
            seen.append(entry)
        else:
            bisect.insort(seen, entry)
        horizon = ts - rule.within_ms
        while seen[0][0] < horizon:
            del seen[0]
        if len(groups) > 1:
            stale = horizon - self.history_slack_ms
            for name in [g for g, entries in groups.items() if entries[-1][0] < stale]:
                del groups[name]
        if len(seen) >= rule.count:
            evidence = [eid for _ts, eid in seen[-rule.count :]]
            details: dict[str, Any] = {"count": rule.count, "within_s": rule.within_ms // 1000}
            if group:
                details["group"] = group.replace("\x1f", "/").strip("/")
            self._emit(
                state, rule, journey, event.channel, ts, evidence, details, fx,
                signal_id(rule.name, state.key, *evidence),
            )  # fmt: skip
            del groups[group]
            if not groups:
                del rules[rule.name]

    def _correlation(self, rule: Rule, event: Event, props: dict[str, Any] | None) -> str | None:
        if rule.correlate is None:
            return ""
        value = rule.correlate(event, props)
        return None if value is _MISSING or value is None else str(value)

    def _open(
        self,
        state: CustomerState,
        rule: Rule,
        tp: Touchpoint,
        props: dict[str, Any] | None,
        journey: Journey | None,
    ) -> None:
        value = self._correlation(rule, tp.event, props)
        if value is None:
            value = ""
        slot = state.rules.setdefault(rule.name, {"open": {}, "fired": []})
        if value in slot["open"] or value in slot["fired"]:
            return  # one signal per correlated value (one per cart)
        slot["open"][value] = [
            tp.ts + rule.within_ms,
            tp.ts,
            tp.event.event_id,
            tp.event.channel,
            journey.id if journey is not None else "",
        ]

    def _close(
        self, state: CustomerState, rule: Rule, event: Event, props: dict[str, Any] | None
    ) -> None:
        slot = state.rules.get(rule.name)
        if not slot or not slot["open"]:
            return
        value = rule.correlate(event, props) if rule.correlate is not None else _MISSING
        if value is _MISSING or value is None:
            slot["open"].clear()  # an end without the correlating value ends them all
        else:
            slot["open"].pop(str(value), None)

    def anything_due(self, state: CustomerState, now: int) -> bool:
        """True if an absence rule of ``state`` has a deadline at or before ``now``."""
        rules = state.rules
        for rule in self._absence:
            slot = rules.get(rule.name)
            if slot:
                for entry in slot["open"].values():
                    if entry[0] <= now:
                        return True
        return False

    def due(self, state: CustomerState, now: int, fx: Any) -> None:
        """Fire absence rules whose deadline the stream time has passed."""
        for rule in self._absence:
            slot = state.rules.get(rule.name)
            if not slot or not slot["open"]:
                continue
            for value, (deadline, start, start_id, channel, journey_id) in list(
                slot["open"].items()
            ):
                if deadline <= now:
                    self._absent(
                        state, rule, value, start, start_id, channel, journey_id, deadline, fx
                    )

    def on_journey_closed(
        self, state: CustomerState, journey: Journey, closed_at: int, fx: Any
    ) -> None:
        """Absence rules with on_journey_close fire when the start's journey closes first."""
        for rule in self._absence:
            if not rule.on_journey_close:
                continue
            slot = state.rules.get(rule.name)
            if not slot or not slot["open"]:
                continue
            for value, (deadline, start, start_id, channel, journey_id) in list(
                slot["open"].items()
            ):
                if journey_id == journey.id and closed_at < deadline:
                    self._absent(
                        state,
                        rule,
                        value,
                        start,
                        start_id,
                        channel,
                        journey_id,
                        closed_at,
                        fx,
                        journey,
                    )

    def _absent(
        self,
        state: CustomerState,
        rule: Rule,
        value: str,
        start: int,
        start_id: str,
        channel: str,
        journey_id: str,
        at: int,
        fx: Any,
        journey: Journey | None = None,
    ) -> None:
        slot = state.rules[rule.name]
        del slot["open"][value]
        slot["fired"].append(value)
        del slot["fired"][:-MAX_FIRED_PER_RULE]
        if journey is None:
            journey = next((j for j in state.journeys if j.id == journey_id), None)
        details: dict[str, Any] = {"waited_s": (at - start) // 1000}
        if value:
            details["correlation"] = value
        self._emit(
            state, rule, journey, channel, at, [start_id], details, fx,
            signal_id(rule.name, state.key, start_id, value), journey_id=journey_id,
        )  # fmt: skip

    def next_deadline(self, state: CustomerState) -> int | None:
        earliest = None
        for rule in self._absence:
            slot = state.rules.get(rule.name)
            if slot and slot["open"]:
                first = min(entry[0] for entry in slot["open"].values())
                if earliest is None or first < earliest:
                    earliest = first
        return earliest

    def expire(self, state: CustomerState, now: int) -> None:
        """Drop threshold history older than any window (keeps state bounded)."""
        for rule in self._threshold:
            if rule.name in state.rules:
                groups = state.rules[rule.name]
                horizon = now - rule.within_ms
                for group in list(groups):
                    kept = [entry for entry in groups[group] if entry[0] >= horizon]
                    if kept:
                        groups[group] = kept
                    else:
                        del groups[group]
                if not groups:
                    del state.rules[rule.name]

    def _emit(
        self,
        state: CustomerState,
        rule: Rule,
        journey: Journey | None,
        channel: str,
        at: int,
        evidence: list[str],
        details: dict[str, Any],
        fx: Any,
        sid: str,
        journey_id: str | None = None,
    ) -> None:
        record: dict[str, Any] = {
            "schema": FRICTION_SIGNAL,
            "signal_id": sid,
            "rule": rule.name,
            "kind": rule.kind,
            "severity": rule.severity,
            "customer_id": state.key,
            "channel": channel,
            "occurred_at": iso_ms(at),
            "evidence": evidence[-50:],
            "details": details,
        }
        jid = journey.id if journey is not None else journey_id
        if jid:
            record["journey_id"] = jid
        if journey is not None and len(journey.friction) < MAX_FRICTION_PER_JOURNEY:
            journey.friction.append((sid, rule.name))
        fx.signals.append((at, record))
