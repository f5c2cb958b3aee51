"""The deployment stack in docker/ is consistent: compose, Dockerfile, Prometheus, Alertmanager, Grafana.

No Docker needed: the files are parsed and cross-checked against each other and
against the code (settings classes, the metrics ports each process serves).
promtool and amtool, Debian tools that `make test` installs, check the
Prometheus and Alertmanager configurations the way the servers will read them.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from touchpoint import config

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS_CONFIG = DOCKER / "prometheus" / "prometheus.yml"
ALERTMANAGER_CONFIG = DOCKER / "alertmanager" / "alertmanager.yml"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "touchpoint.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "touchpoint.yaml"
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
_INTERPOLATION = re.compile(r"\$\{([A-Z0-9_]+)(?::?[-?]([^}]*))?\}")


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def services() -> dict[str, dict[str, Any]]:
    return compose()["services"]


def touchpoint_services() -> dict[str, dict[str, Any]]:
    """Services running the Touchpoint image."""
    return {
        name: s for name, s in services().items() if s.get("image", "").startswith("touchpoint")
    }


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_text(service: dict[str, Any]) -> str:
    parts = []
    for key in ("entrypoint", "command"):
        value = service.get(key) or []
        parts.extend([value] if isinstance(value, str) else [str(v) for v in value])
    return " ".join(parts)


def role(service: dict[str, Any]) -> str:
    """The `touchpoint` subcommand a service runs."""
    command = service.get("command") or []
    if service.get("entrypoint"):  # a shell wrapper: `... exec touchpoint <role>`
        match = re.search(r"\btouchpoint (\w+)", command_text(service))
        assert match, f"no `touchpoint <command>` in {command_text(service)!r}"
        return match.group(1)
    return str(command[0])


def option(service: dict[str, Any], name: str) -> str | None:
    words = shlex.split(command_text(service).replace("$$", "$"))
    return words[words.index(name) + 1] if name in words else None


def settings_classes() -> list[type[BaseSettings]]:
    return [
        obj
        for obj in vars(config).values()
        if isinstance(obj, type) and issubclass(obj, BaseSettings) and obj is not BaseSettings
    ]


def setting_names() -> set[str]:
    """Every TOUCHPOINT_* variable the settings classes read."""
    names = set()
    for cls in settings_classes():
        prefix = cls.model_config.get("env_prefix", "")
        for field_name, field in cls.model_fields.items():
            alias = field.validation_alias
            if isinstance(alias, AliasChoices):
                names.update(str(choice) for choice in alias.choices)
            else:
                names.add(f"{prefix}{field_name}".upper())
    return names


def container_ports(service: dict[str, Any]) -> set[int]:
    ports = {int(p) for p in service.get("expose", [])}
    for mapping in service.get("ports", []):
        ports.add(int(str(mapping).split(":")[-1].split("/")[0]))
    return ports


# ---------------------------------------------------------------- compose
def test_every_service_has_an_image_or_a_build_whose_files_exist() -> None:
    for name, service in services().items():
        assert service.get("image") or service.get("build"), name
        build = service.get("build")
        if build:
            context = (DOCKER / build["context"]).resolve()
            assert context.is_dir(), (name, context)
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name


def test_named_volumes_are_declared_and_mounted_files_exist() -> None:
    declared = set(compose().get("volumes") or {})
    used = set()
    for name, service in services().items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0] if isinstance(volume, str) else volume["source"]
            if source.startswith((".", "/")):
                path = (DOCKER / source).resolve()
                assert path.exists(), f"{name} mounts {source}, which does not exist"
                assert DOCKER in path.parents or path == DOCKER, f"{name}: {source} outside docker/"
            else:
                assert source in declared, f"{name} uses undeclared volume {source}"
                used.add(source)
    assert used == declared, f"declared but unused volumes: {declared - used}"


def test_depends_on_targets_exist_and_the_chain_starts_at_kafka() -> None:
    all_services = services()
    for name, service in all_services.items():
        for target in service.get("depends_on") or []:
            assert target in all_services, f"{name} depends on unknown service {target}"
    topics = all_services["topics"]
    assert topics["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert "healthcheck" in all_services["kafka"]
    for name in ("ingest", "worker", "collector", "simulator"):
        condition = all_services[name]["depends_on"]["topics"]["condition"]
        assert condition == "service_completed_successfully", name


def test_environment_variables_are_real_settings() -> None:
    known = setting_names()
    assert "TOUCHPOINT_KAFKA_BOOTSTRAP_SERVERS" in known  # the derivation works
    for name, service in touchpoint_services().items():
        used = set(environment(service)) | set(
            re.findall(r"\bTOUCHPOINT_[A-Z0-9_]+", command_text(service))
        )
        unknown = {v for v in used if v.startswith("TOUCHPOINT_")} - known
        assert not unknown, f"{name}: not Touchpoint settings: {sorted(unknown)}"


def test_environment_values_pass_settings_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    for service in touchpoint_services().values():
        with monkeypatch.context() as patch:
            for variable in list(setting_names()):
                patch.delenv(variable, raising=False)
            for variable, value in environment(service).items():
                # ${VAR:-default}: the default, or a stand-in long enough for a token.
                value = _INTERPOLATION.sub(
                    lambda m: m.group(2) or "stand-in-value-0123456789", value
                )
                patch.setenv(variable, value)
            for cls in settings_classes():
                if cls is config.CollectorSettings and role(service) != "collector":
                    continue  # only the collector needs tokens
                config.load(cls)  # raises ConfigError naming the variable


def test_workers_scale_and_route_lookups_to_each_other() -> None:
    worker = services()["worker"]
    assert "container_name" not in worker
    assert worker["deploy"]["replicas"] >= 2
    for mapping in worker.get("ports", []):
        assert ":" not in str(mapping), f"fixed host port {mapping} prevents scaling"
    env = environment(worker)
    # Listen on every interface, advertise an address the other replicas can reach.
    assert env["TOUCHPOINT_WORKER_WEB_HOST"] == "0.0.0.0"
    text = command_text(worker)
    assert "TOUCHPOINT_WORKER_CANONICAL_URL" in text
    port = env.get("TOUCHPOINT_WORKER_WEB_PORT", str(config.WorkerSettings().web_port))
    assert f"):{port}" in text, "the canonical URL must name the web port"
    for name in ("ingest", "worker"):
        assert "container_name" not in services()[name]


# ---------------------------------------------------------------- Prometheus
def listening_port(service: dict[str, Any]) -> int | None:
    """The port a Touchpoint service serves /metrics on, per its configuration."""
    env = environment(service)
    kind = role(service)
    if kind == "worker":
        flag = option(service, "--web-port")
        return int(
            flag or env.get("TOUCHPOINT_WORKER_WEB_PORT") or config.WorkerSettings().web_port
        )
    if kind == "collector":
        default = config.CollectorSettings.model_fields["port"].default
        return int(option(service, "--port") or env.get("TOUCHPOINT_COLLECTOR_PORT") or default)
    if kind == "ingest":
        flag = option(service, "--metrics-port")
        return int(flag) if flag else None  # no flag: ingest serves no metrics
    return None


def scrape_targets() -> list[tuple[str, str, int]]:
    """(job, host, port) of every scrape target in prometheus.yml."""
    targets = []
    for job in yaml.safe_load(PROMETHEUS_CONFIG.read_text())["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets += [(job["job_name"], host, int(sd["port"])) for host in sd["names"]]
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                targets.append((job["job_name"], host, int(port)))
    return targets


def test_scrape_targets_match_the_services_ports() -> None:
    all_services = services()
    jobs = {job for job, _host, _port in scrape_targets()}
    assert {"touchpoint-worker", "touchpoint-ingest", "touchpoint-collector"} <= jobs
    for job, host, port in scrape_targets():
        if host == "localhost":
            continue  # Prometheus itself
        assert host in all_services, f"{job} scrapes unknown service {host}"
        service = all_services[host]
        assert port in container_ports(service), f"{job}: {host} does not expose {port}"
        if host in touchpoint_services():
            assert listening_port(service) == port, f"{job}: {host} serves another port"


def test_alertmanager_target_and_rule_files_are_wired() -> None:
    prometheus = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    for manager in prometheus["alerting"]["alertmanagers"]:
        for target in manager["static_configs"][0]["targets"]:
            host, _, port = target.rpartition(":")
            assert int(port) in container_ports(services()[host]), target
    mounts = [v.split(":") for v in services()["prometheus"]["volumes"]]
    config_dir = next(Path(t).parent for s, t, *_ in mounts if s.endswith("prometheus.yml"))
    mounted = {t: s for s, t, *_ in mounts}
    for rule_file in prometheus["rule_files"]:
        source = mounted.get(str(config_dir / rule_file))
        assert source, f"{rule_file} is not mounted next to the config"
        assert (DOCKER / source).resolve() == (PROMETHEUS_CONFIG.parent / rule_file).resolve()


def test_jobs_named_by_alert_rules_and_dashboard_are_scraped() -> None:
    jobs = {job for job, _host, _port in scrape_targets()}
    text = (DOCKER / "prometheus" / "alerts.yml").read_text() + DASHBOARD.read_text()
    named = set(re.findall(r'job\\?="([\w-]+)"', text))
    patterns = re.findall(r'job=~\\?"([^"\\]+)\\?"', text)
    assert named, "no job selectors found (the pattern is wrong)"
    assert named <= jobs, named - jobs
    for pattern in patterns:
        assert any(re.fullmatch(pattern, job) for job in jobs), pattern


def test_alert_names_in_the_alertmanager_config_exist_in_the_rules() -> None:
    """A misspelt name in an inhibition or route silently matches nothing."""
    rules = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    defined = {rule.get("alert") for group in rules["groups"] for rule in group["rules"]}
    manager = ALERTMANAGER_CONFIG.read_text()
    referenced = set()
    for expression in re.findall(r'alertname=~?"([^"]+)"', manager):
        referenced.update(expression.split("|"))
    assert referenced, "no alertname matchers found (the pattern is wrong)"
    assert referenced <= defined, referenced - defined


@pytest.mark.skipif(
    PROMTOOL is None, reason="promtool missing: `make test` installs Debian's prometheus package"
)
def test_promtool_accepts_the_prometheus_config() -> None:
    result = subprocess.run(
        [str(PROMTOOL), "check", "config", str(PROMETHEUS_CONFIG)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.skipif(
    AMTOOL is None,
    reason="amtool missing: `make test` installs Debian's prometheus-alertmanager package",
)
def test_amtool_accepts_the_alertmanager_config() -> None:
    result = subprocess.run(
        [str(AMTOOL), "check-config", str(ALERTMANAGER_CONFIG)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------- Grafana
def test_grafana_provisioning_matches_the_dashboard_and_the_stack() -> None:
    datasource = yaml.safe_load(DATASOURCES.read_text())["datasources"][0]
    text = DASHBOARD.read_text()
    assert "${DS_" not in text, "the dashboard must use the provisioned datasource uid"
    dashboard = json.loads(text)
    ids = []

    def check(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            ids.append(panel["id"])
            check(panel.get("panels", []))
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], f"{panel['title']}: no query"
            for target in panel["targets"]:
                assert target["datasource"]["uid"] == datasource["uid"], panel["title"]
                assert target["expr"].strip(), panel["title"]

    check(dashboard["panels"])
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    url = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"])
    assert url, datasource["url"]
    assert int(url.group(2)) in container_ports(services()[url.group(1)])
    grafana = services()["grafana"]
    mounts = {v.split(":")[1]: v.split(":")[0] for v in grafana["volumes"]}
    provider_path = yaml.safe_load(DASHBOARD_PROVIDERS.read_text())["providers"][0]["options"][
        "path"
    ]
    assert (DOCKER / mounts[provider_path]).resolve() == DASHBOARD.parent.resolve()
    for kind in ("datasources", "dashboards"):
        source = mounts[f"/etc/grafana/provisioning/{kind}"]
        assert (DOCKER / source).resolve() == (DATASOURCES.parents[1] / kind).resolve()


# ---------------------------------------------------------------- Dockerfile
def test_dockerfile_copies_existing_files_that_the_build_context_sends() -> None:
    lines = (DOCKER / "Dockerfile").read_text().splitlines()
    assert any(re.fullmatch(r"FROM python:3\.11-slim", line) for line in lines)
    assert 'ENTRYPOINT ["touchpoint"]' in lines
    context = (DOCKER / services()["worker"]["build"]["context"]).resolve()
    ignore = (context / ".dockerignore").read_text().splitlines()
    sent = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert "*" in ignore, ".dockerignore should send only what the image needs"
    copies = [line.split()[1:-1] for line in lines if line.startswith("COPY ")]
    assert copies
    for sources in copies:
        for source in sources:
            assert (context / source).exists(), f"COPY {source}: missing"
            assert source.rstrip("/") in sent, f"COPY {source}: excluded by .dockerignore"
    # Everything the package build needs is copied (hatch packages + readme).
    pyproject = (ROOT / "pyproject.toml").read_text()
    packages = re.search(r"packages = \[([^\]]*)\]", pyproject)
    assert packages
    needed = set(re.findall(r'"([^"]+)"', packages.group(1))) | {"pyproject.toml", "README.md"}
    copied = {s.rstrip("/") for sources in copies for s in sources}
    assert needed <= copied, needed - copied
