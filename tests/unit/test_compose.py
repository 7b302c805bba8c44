"""docker-compose.yml and the Dockerfile, checked against the code they run.

No Docker engine on the development and CI machines, so the stack cannot be started here:
these tests keep it correct instead. Every ``METER_*`` name must be a field of
``worker.settings.Settings`` (a renamed setting breaks this file), every value must pass the
settings' own validation, every address must point at a service and a port that service
listens on, every ``meter`` command line must parse with the real CLI parser, health checks
and start order must be there, and no secret may be written in the files.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata
import os
import re
import shlex
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from packaging.requirements import Requirement
from pydantic import SecretStr, ValidationError

from tests import containers
from tests.integration.helpers import REPO_ROOT
from worker.cli import build_parser
from worker.settings import Settings

COMPOSE_FILE = REPO_ROOT / "docker-compose.yml"
DOCKERFILE = REPO_ROOT / "Dockerfile"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
PYPROJECT = REPO_ROOT / "pyproject.toml"

ENV_PREFIX = str(Settings.model_config.get("env_prefix", ""))
SETTING_NAMES = {f"{ENV_PREFIX}{name}".upper(): name for name in Settings.model_fields}
SECRET_SETTINGS = {
    f"{ENV_PREFIX}{name}".upper() for name, field in Settings.model_fields.items() if field.annotation is SecretStr
}
# Per-instance settings: may differ between services; every other one must agree everywhere.
PER_INSTANCE = {"METER_NODE_ID", "METER_HTTP_HOST", "METER_HTTP_PORT"}
SECRET_NAME = re.compile(r"PASSWORD|SECRET|API_KEY|TOKEN|SEED|CREDENTIAL", re.IGNORECASE)
INTERPOLATION = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?])(?P<arg>[^}]*))?\}")
REQUIRED_ONLY = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*:?\?[^}]*\}")  # ${VAR:?message}: no default, no literal
METER_NAME = re.compile(r"\bMETER_[A-Z0-9_]+\b")

# What each role needs. Kafka: the subcommands that connect to the broker; ClickHouse: to the store.
USES_KAFKA = {"worker", "topics", "node", "block", "unblock", "limits", "demo"}
USES_CLICKHOUSE = {"worker", "migrate", "usage", "serve-api", "top", "key-usage", "account-usage", "key-state"}
ROLE_REQUIRED: dict[str, set[str]] = {
    "worker": {"METER_KAFKA_BOOTSTRAP", "METER_CLICKHOUSE_DSN", "METER_HTTP_HOST", "METER_HTTP_PORT"},
    "topics": {"METER_KAFKA_BOOTSTRAP"},
    "migrate": {"METER_CLICKHOUSE_DSN"},
    "node": {"METER_KAFKA_BOOTSTRAP", "METER_NODE_SECRET", "METER_DEMO_SEED", "METER_NODE_ID"},
    "serve-api": {"METER_CLICKHOUSE_DSN", "METER_ADMIN_API_KEY", "METER_HTTP_HOST", "METER_HTTP_PORT"},
}
HEALTH_PATH = {"worker": "/health/ready", "node": "/health"}


# -- loading ----------------------------------------------------------------------------------


def _load_compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a mapping"
    return data


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_compose()


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    found = compose.get("services")
    assert isinstance(found, dict), "no services"
    assert found, "no services"
    return found


@pytest.fixture(autouse=True)
def _no_meter_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Settings built here must come from the compose file only, not from this shell."""
    for name in list(os.environ):
        if name.startswith(ENV_PREFIX):
            monkeypatch.delenv(name)


def resolve(value: str, required: str = "set-by-user-as-long-as-a-real-secret") -> str:
    """Compose interpolation: ``${V:-default}`` gives the default, a required ``${V:?msg}`` a placeholder
    (as long as the secrets must be: >= 32 bytes)."""

    def one(match: re.Match[str]) -> str:
        op = match.group("op") or ""
        return match.group("arg") if "-" in op else required

    return INTERPOLATION.sub(one, value.replace("$$", "\x00")).replace("\x00", "$")


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    assert isinstance(env, dict)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def meter_invocations(service: dict[str, Any]) -> list[list[str]]:
    """The ``meter`` argv lists a service runs (image entrypoint ``meter``, or ``sh -c "meter ..."``)."""
    if "build" not in service:
        return []
    entrypoint = service.get("entrypoint")
    command = service.get("command") or dockerfile().cmd
    if isinstance(command, str):
        command = shlex.split(command)
    if entrypoint is None:
        return [[str(c) for c in command]]
    entry = [entrypoint] if isinstance(entrypoint, str) else list(entrypoint)
    if entry[:2] == ["sh", "-c"] or entry[:2] == ["/bin/sh", "-c"]:
        script = " ".join(str(c) for c in [*entry[2:], *command])
        runs = []
        for part in re.split(r"&&|\|\||;|\n", script):
            words = shlex.split(part)
            if words and words[0] == "meter":
                runs.append(words[1:])
        return runs
    if entry == ["meter"]:
        return [[str(c) for c in command]]
    pytest.fail(f"unexpected entrypoint {entry!r}: cannot tell which meter command runs")


def subcommands(service: dict[str, Any]) -> set[str]:
    return {argv[0] for argv in meter_invocations(service) if argv}


def meter_services(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if meter_invocations(svc)}


def workers(services: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {name: svc for name, svc in services.items() if "worker" in subcommands(svc)}


def effective_settings(service: dict[str, Any]) -> Settings:
    """The Settings the service's processes build (compose values over the defaults)."""
    given = {**dockerfile().env, **{k: resolve(v) for k, v in environment(service).items()}}
    values = {SETTING_NAMES[k]: v for k, v in given.items() if k in SETTING_NAMES}
    return Settings.model_validate(values)


def parser_subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("meter has no subcommands")


class Dockerfile:
    def __init__(self, text: str) -> None:
        # join continuation lines, drop comments
        joined = re.sub(r"\\\n", " ", text)
        self.instructions: list[tuple[str, str]] = []
        for line in joined.splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                word, _, rest = line.partition(" ")
                self.instructions.append((word.upper(), rest.strip()))
        stages = [i for i, (w, _) in enumerate(self.instructions) if w == "FROM"]
        self.final = self.instructions[stages[-1] :] if stages else []
        self.froms = [rest.split()[0] for w, rest in self.instructions if w == "FROM"]
        self.env: dict[str, str] = {}
        for word, rest in self.final:
            if word == "ENV":
                for token in shlex.split(rest):
                    if "=" in token:
                        key, _, value = token.partition("=")
                        self.env[key] = value
        self.entrypoint = self._exec_form("ENTRYPOINT")
        self.cmd = self._exec_form("CMD")
        users = [rest for w, rest in self.final if w == "USER"]
        self.user = users[-1] if users else "root"

    def _exec_form(self, word: str) -> list[str]:
        found = [rest for w, rest in self.final if w == word]
        if not found:
            return []
        value = yaml.safe_load(found[-1])  # the JSON exec form is valid YAML
        assert isinstance(value, list), f"{word} must use the exec form [...]: {found[-1]}"
        return [str(v) for v in value]

    def copies(self) -> list[tuple[list[str], str]]:
        out = []
        for word, rest in self.final:
            if word in ("COPY", "ADD") and "--from" not in rest:
                parts = [p for p in shlex.split(rest) if not p.startswith("--")]
                out.append((parts[:-1], parts[-1]))
        return out


def dockerfile() -> Dockerfile:
    return Dockerfile(DOCKERFILE.read_text())


def _url_in(test: Any) -> str:
    text = " ".join(test) if isinstance(test, list) else str(test)
    match = re.search(r"https?://[^\s'\"]+", text)
    assert match, f"no URL in health check {text!r}"
    return match.group(0)


def listening_ports(name: str, service: dict[str, Any]) -> set[int]:
    """Container ports a service listens on, from its own configuration."""
    env = environment(service)
    image = str(service.get("image", ""))
    if "build" in service:
        ports = set()
        for argv in meter_invocations(service):
            if argv and argv[0] == "node":
                args = parser_subcommands()["node"].parse_args(argv[1:])
                ports.add(int(args.port))
            elif argv and argv[0] in ("worker", "serve-api"):
                ports.add(int(resolve(env.get("METER_HTTP_PORT", str(Settings.model_fields["http_port"].default)))))
        return ports
    if "kafka" in image:
        return {int(addr.rsplit(":", 1)[1]) for addr in env.get("KAFKA_LISTENERS", "").split(",") if ":" in addr}
    if "clickhouse" in image:
        return {8123, 9000}
    return set()


# -- the stack ----------------------------------------------------------------------------


def test_services_exist(services: dict[str, dict[str, Any]]) -> None:
    for name in ("kafka", "clickhouse", "init", "node", "query-api"):
        assert name in services, f"service {name} missing"
    replicas = sum(int(((svc.get("deploy") or {}).get("replicas")) or 1) for svc in workers(services).values())
    assert replicas >= 2, f"need two or more workers, found {sorted(workers(services))}"
    assert subcommands(services["init"]) >= {"topics", "migrate"}
    assert subcommands(services["node"]) == {"node"}
    assert subcommands(services["query-api"]) == {"serve-api"}


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        image = svc.get("image")
        assert image, f"{name}: no image"
        repo, _, tag = str(image).rpartition(":")
        assert repo, f"{name}: image {image} has no tag"
        assert "/" not in tag, f"{name}: image {image} has no tag"
        assert tag not in ("", "latest"), f"{name}: image {image} is not pinned"
        assert "$" not in tag, f"{name}: image {image} is not pinned"


def test_official_images_and_versions(services: dict[str, dict[str, Any]]) -> None:
    kafka_repo, _, kafka_tag = services["kafka"]["image"].rpartition(":")
    assert kafka_repo == "apache/kafka"
    pom = (REPO_ROOT / "infra" / "kafka" / "pom.xml").read_text()
    local = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert local, "infra/kafka/pom.xml names no kafka.version"
    assert kafka_tag == local.group(1), "compose runs another Kafka version than infra/kafka"
    ch_repo, _, ch_tag = services["clickhouse"]["image"].rpartition(":")
    assert ch_repo == "clickhouse/clickhouse-server"
    assert re.match(r"\d+\.\d+", ch_tag), f"ClickHouse tag {ch_tag} is not a version"
    version = tomllib.loads(PYPROJECT.read_text())["project"]["version"]
    for name, svc in services.items():
        if "build" in svc:
            assert svc["image"] == f"usage-meter:{version}", f"{name}: meter image tag != project version"
            assert svc["build"].get("dockerfile", "Dockerfile") == "Dockerfile"


def test_kafka_is_kraft_single_node(services: dict[str, dict[str, Any]]) -> None:
    import base64

    env = environment(services["kafka"])
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    assert "ZOOKEEPER" not in " ".join(env).upper()
    assert len(base64.urlsafe_b64decode(env["CLUSTER_ID"] + "==")) == 16, "CLUSTER_ID must be a base64 UUID"
    for key in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR"):
        assert env[key] == "1", f"{key} must be 1 on a single broker"
    names = {a.split("://")[0] for a in env["KAFKA_LISTENERS"].split(",")}
    mapped = {p.split(":")[0] for p in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(",")}
    assert names <= mapped, "every listener needs a security protocol"
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in names
    advertised = {a.split("://")[0] for a in env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    assert advertised <= names - {env["KAFKA_CONTROLLER_LISTENER_NAMES"]}


# -- settings -------------------------------------------------------------------------------


def test_every_meter_variable_is_a_setting() -> None:
    for path in (COMPOSE_FILE, DOCKERFILE):
        unknown = set(METER_NAME.findall(path.read_text())) - set(SETTING_NAMES)
        assert not unknown, f"{path.name}: not fields of worker.settings.Settings: {sorted(unknown)}"


def test_values_pass_the_settings_validation(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in meter_services(services).items():
        try:
            effective_settings(svc)
        except ValidationError as exc:
            pytest.fail(f"{name}: its METER_* values are refused by Settings:\n{exc}")


def test_each_role_has_its_settings(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in meter_services(services).items():
        env = environment(svc)
        for sub in subcommands(svc):
            missing = ROLE_REQUIRED.get(sub, set()) - set(env) - set(dockerfile().env)
            assert not missing, f"{name} ({sub}) lacks {sorted(missing)}"
            if sub in ("worker", "serve-api"):
                host = effective_settings(svc).http_host
                assert host == "0.0.0.0", f"{name}: METER_HTTP_HOST={host} is unreachable from outside the container"
            if sub == "node":
                args = parser_subcommands()["node"].parse_args(next(a for a in meter_invocations(svc) if a)[1:])
                assert args.host == "0.0.0.0", f"{name}: the node listens on {args.host}, unreachable"


def test_shared_settings_agree_across_services(services: dict[str, dict[str, Any]]) -> None:
    """Topics, group, database, horizon ...: one value across the stack (defaults included)."""
    kafka_fields = [SETTING_NAMES[n] for n in SETTING_NAMES if n.startswith(("METER_KAFKA", "METER_EVENTS"))]
    kafka_fields += ["decisions_topic", "dlq_topic", "limits_topic", "decisions_partitions"]
    store_fields = ["clickhouse_dsn", "clickhouse_database", "dedup_horizon_hours"]
    store_fields += ["ttl_minute_days", "ttl_hour_days", "ttl_day_days"]
    for fields, users in ((kafka_fields, USES_KAFKA), (store_fields, USES_CLICKHOUSE)):
        seen: dict[str, tuple[str, object]] = {}
        for name, svc in meter_services(services).items():
            if not subcommands(svc) & users:
                continue
            effective = effective_settings(svc)
            for field in fields:
                value = getattr(effective, field)
                first = seen.setdefault(field, (name, value))
                assert value == first[1], f"{field}: {first[0]} has {first[1]!r}, {name} has {value!r}"
    group = {effective_settings(svc).consumer_group for svc in workers(services).values()}
    assert len(group) == 1, f"workers in different consumer groups: {group}"
    for name, svc in services.items():
        env = environment(svc)
        for var in set(env) & set(SETTING_NAMES) - PER_INSTANCE:
            for other_name, other in services.items():
                other_env = environment(other)
                if var in other_env:
                    assert other_env[var] == env[var], f"{var} differs between {name} and {other_name}"


def test_addresses_point_at_services_and_their_ports(services: dict[str, dict[str, Any]]) -> None:
    kafka_env = environment(services["kafka"])
    advertised = {a.split("://", 1)[1] for a in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    ch_env = environment(services["clickhouse"])
    for name, svc in meter_services(services).items():
        settings = effective_settings(svc)
        subs = subcommands(svc)
        if subs & USES_KAFKA:
            for address in settings.kafka_bootstrap.split(","):
                host, _, port = address.rpartition(":")
                assert host in services, f"{name}: METER_KAFKA_BOOTSTRAP host {host} is no service"
                assert address in advertised, f"{name}: {address} is not an advertised listener of kafka"
                assert int(port) in listening_ports(host, services[host])
        if subs & USES_CLICKHOUSE:
            dsn = urlsplit(settings.clickhouse_dsn)
            assert dsn.scheme in ("http", "https"), f"{name}: a containerised meter needs a ClickHouse server DSN"
            assert dsn.hostname in services, f"{name}: ClickHouse host {dsn.hostname} is no service"
            assert dsn.port in listening_ports(dsn.hostname, services[dsn.hostname])
            assert dsn.port == urlsplit(_url_in(services[dsn.hostname]["healthcheck"]["test"])).port
            raw = environment(svc).get("METER_CLICKHOUSE_DSN", "")
            assert dsn.username == ch_env["CLICKHOUSE_USER"], f"{name}: DSN user is not the server's user"
            password = re.search(r"://[^:/@]+:(\$\{[^}]+\})@", raw)
            same = password is not None and password.group(1) == ch_env["CLICKHOUSE_PASSWORD"]
            assert same, f"{name}: DSN password must be the same ${{VAR}} as clickhouse's CLICKHOUSE_PASSWORD"
    assert len(workers(services)) < 2 or all(
        not effective_settings(s).clickhouse_dsn.startswith("chdb:") for s in workers(services).values()
    ), "several workers cannot share chDB (one process per data directory)"


def test_published_ports_are_listened_on(services: dict[str, dict[str, Any]]) -> None:
    host_ports: dict[str, str] = {}
    for name, svc in services.items():
        for spec in svc.get("ports") or []:
            parts = str(spec).split("/")[0].split(":")
            assert len(parts) >= 2, f"{name}: publish {spec} with an explicit host port"
            container_port = int(parts[-1])
            assert container_port in listening_ports(name, svc), f"{name}: publishes {spec}, listens elsewhere"
            host = ":".join(parts[:-1])
            assert host not in host_ports, f"{name} and {host_ports.get(host)} both publish {host}"
            host_ports[host] = name
            assert parts[0] == "127.0.0.1", f"{name}: publish on 127.0.0.1 only (demo stack): {spec}"


def test_health_checks(services: dict[str, dict[str, Any]]) -> None:
    need = {"kafka", "clickhouse", "node", "query-api", *workers(services)}
    for name in need:
        check = services[name].get("healthcheck")
        assert check, f"{name}: no health check"
        assert not check.get("disable"), f"{name}: health check disabled"
        test = check.get("test") or [""]
        assert test[0] in ("CMD", "CMD-SHELL"), f"{name}: health check test must be CMD or CMD-SHELL"
    for name, svc in meter_services(services).items():
        if name not in need:
            continue
        url = urlsplit(_url_in(svc["healthcheck"]["test"]))
        assert url.hostname in ("127.0.0.1", "localhost")
        assert url.port in listening_ports(name, svc), f"{name}: health check port {url.port} is not served"
        for sub in subcommands(svc):
            if sub in HEALTH_PATH:
                assert url.path == HEALTH_PATH[sub], f"{name}: health check on {url.path}, not {HEALTH_PATH[sub]}"
    assert "9092" in " ".join(services["kafka"]["healthcheck"]["test"])


def test_start_order(services: dict[str, dict[str, Any]]) -> None:
    def depends(name: str) -> dict[str, str]:
        deps = services[name].get("depends_on") or {}
        assert isinstance(deps, dict), f"{name}: depends_on needs conditions"
        return {k: v.get("condition", "service_started") for k, v in deps.items()}

    for name, svc in services.items():
        for dep, condition in depends(name).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep} healthy: it has no health check"
            if condition == "service_completed_successfully":
                assert str(services[dep].get("restart", "no")) == "no", f"{dep} is one-shot: restart must be no"
        if name not in meter_services(services):
            continue
        subs, deps = subcommands(svc), depends(name)
        if subs & USES_KAFKA:
            assert deps.get("kafka") == "service_healthy", f"{name} must wait for kafka healthy"
        if subs & USES_CLICKHOUSE:
            assert deps.get("clickhouse") == "service_healthy", f"{name} must wait for clickhouse healthy"
        if name != "init":
            assert deps.get("init") == "service_completed_successfully", f"{name} must wait for init"


def test_no_secret_is_written_down(services: dict[str, dict[str, Any]]) -> None:
    for name, svc in services.items():
        for key, value in environment(svc).items():
            secret = key in SECRET_SETTINGS or bool(SECRET_NAME.search(key))
            if secret:
                assert REQUIRED_ONLY.fullmatch(value), f"{name}: {key} must be only ${{VAR:?message}}, got {value!r}"
            for match in re.finditer(r"://([^:/@\s]+):([^@\s]+)@", value):
                assert REQUIRED_ONLY.fullmatch(match.group(2)), f"{name}: {key} has a literal password"
        assert not SECRET_NAME.search(str(svc.get("healthcheck", ""))), f"{name}: health check mentions a secret"
    for key in dockerfile().env:
        assert key not in SECRET_SETTINGS, f"Dockerfile bakes in {key}"
        assert not SECRET_NAME.search(key), f"Dockerfile bakes in {key}"
    roles = {sub: svc for svc in meter_services(services).values() for sub in subcommands(svc)}
    assert {"METER_NODE_SECRET", "METER_DEMO_SEED"} <= set(environment(roles["node"]))
    assert "METER_ADMIN_API_KEY" in environment(roles["serve-api"])


def test_meter_command_lines_parse(services: dict[str, dict[str, Any]]) -> None:
    parser = build_parser()
    known = set(parser_subcommands())
    image = dockerfile()
    runs = [("Dockerfile CMD", [*image.entrypoint[1:], *image.cmd])]
    runs += [(name, argv) for name, svc in services.items() for argv in meter_invocations(svc)]
    for where, argv in runs:
        assert argv, f"{where}: runs `meter` without a command"
        assert argv[0] in known, f"{where}: `meter {' '.join(argv)}` is no meter command ({sorted(known)})"
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{where}: `meter {' '.join(argv)}` does not parse")


# -- the image ------------------------------------------------------------------------------


def test_dockerfile_builds_the_meter_image() -> None:
    image = dockerfile()
    for base in image.froms:
        if base.startswith("python"):
            assert base == "python:3.11-slim", f"base image {base}"
    assert "python:3.11-slim" in image.froms
    assert image.entrypoint == ["meter"], "ENTRYPOINT must be the meter console script"
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert scripts.get("meter") == "worker.cli:main"
    assert re.search(r"pip install[^\n]* \.(\s|$)", DOCKERFILE.read_text()), "the project is installed by pip install ."
    assert image.user.split(":")[0] not in ("root", "0"), "the image must run as a non-root user"


def test_dockerfile_copies_the_packages_and_they_bring_their_migrations() -> None:
    text = DOCKERFILE.read_text()
    packages = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        package = pattern.rstrip("*")
        assert re.search(rf"COPY\s+{package}/?\s", text), f"the build does not copy {package}/"
    package_data = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-data"]["worker"]
    assert "store/sql/*.sql" in package_data, "the migrations must ship as package data"
    assert list((REPO_ROOT / "worker" / "store" / "sql").glob("*.sql")), "no migrations in worker/store/sql"
    ignored = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    assert not ignored & {"pyproject.toml", *(p.rstrip("*") for p in packages)}, ".dockerignore hides sources"


def test_no_service_points_the_migrations_elsewhere(services: dict[str, dict[str, Any]]) -> None:
    """The image runs the migrations it was built with (package data), not a copy beside it."""
    assert "METER_MIGRATIONS_DIR" not in dockerfile().env
    for name, svc in meter_services(services).items():
        assert "METER_MIGRATIONS_DIR" not in environment(svc), name


def _package_files() -> Iterator[Path]:
    packages = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    for pattern in packages:
        yield from (REPO_ROOT / pattern.rstrip("*")).rglob("*")


def test_image_ships_package_data() -> None:
    """``pip install .`` (not editable) copies only .py files unless package-data names the rest."""
    config = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]
    globs = config.get("package-data", {})
    missing = []
    for path in _package_files():
        if not path.is_file() or path.suffix in (".py", ".pyc") or "__pycache__" in path.parts:
            continue
        package = path.relative_to(REPO_ROOT).parts[0]
        inside = path.relative_to(REPO_ROOT / package)
        if not any(inside.match(g) for key in (package, "*") for g in globs.get(key, [])):
            missing.append(str(path.relative_to(REPO_ROOT)))
    assert not missing, f"not in [tool.setuptools.package-data], so not in the image: {missing}"


def _declared_closure() -> set[str]:
    """Distributions that ``pip install .`` brings: the dependencies and theirs (with extras)."""

    def norm(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    todo = [Requirement(r) for r in tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]]
    seen: set[str] = set()
    while todo:
        req = todo.pop()
        key = norm(req.name)
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(req.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in requires:
            sub = Requirement(text)
            marker = sub.marker
            if marker is None or any(marker.evaluate({"extra": e}) for e in (req.extras or {""})):
                todo.append(sub)
    return seen


def test_image_installs_every_imported_distribution() -> None:
    """Every third-party import of the installed packages is a (transitive) dependency."""
    ours = {
        p.rstrip("*") for p in tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["packages"]["find"]["include"]
    }
    imported: dict[str, str] = {}
    for path in _package_files():
        if path.suffix != ".py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            for n in names:
                top = n.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ours:
                    imported.setdefault(top, str(path.relative_to(REPO_ROOT)))
    dists = importlib.metadata.packages_distributions()
    closure = _declared_closure()
    missing = {}
    for module, where in imported.items():
        dist_names = {re.sub(r"[-_.]+", "-", d).lower() for d in dists.get(module, [module])}
        if not dist_names & closure:
            missing[module] = where
    assert not missing, f"imported but not in [project.dependencies] (absent from the image): {missing}"


# -- testcontainers fallback ----------------------------------------------------------------


def test_docker_probe_is_bounded_when_the_engine_does_not_answer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://192.0.2.1:2375")  # TEST-NET-1: never answers
    started = time.monotonic()
    assert containers.docker_engine_available(timeout=1.0) is False
    assert time.monotonic() - started < 2.5


def test_no_engine_means_the_local_broker(monkeypatch: pytest.MonkeyPatch) -> None:
    started = time.monotonic()
    available = containers.docker_engine_available(timeout=2.0)
    assert time.monotonic() - started < 3.0
    if available:
        pytest.skip("a Docker engine answers here: the fixtures would use it")
    services = containers._Services()
    assert services.kafka() is None
    assert services.clickhouse() is None
    assert time.monotonic() - started < 6.0
    monkeypatch.setenv("USE_TESTCONTAINERS", "1")
    with pytest.raises(RuntimeError, match="requires a Docker engine"):
        containers._Services().kafka()


def test_testcontainers_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("USE_TESTCONTAINERS", "0")
    started = time.monotonic()
    assert containers._Services().kafka() is None
    assert time.monotonic() - started < 0.5
