"""deploy/docker without a Docker engine: the compose file, Prometheus' scrape config and the
Dockerfiles are checked offline against the files, services and ports they name. Where Debian's
docker-compose (1.29) or promtool is on PATH, the real tool validates the file as well."""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy.envoy.generate import Topology
from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.postprocess.settings import PostprocessSettings
from services.preprocess.settings import PreprocessSettings
from tests.deploy.manifests import MESH, REPO, committed_secret_problems

DOCKER = REPO / "deploy" / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
TOPOLOGY = Topology.model_validate(yaml.safe_load((DOCKER / "topology.compose.yaml").read_text()))


def _default(settings, field: str) -> int:
    return settings.model_fields[field].default


# Every metrics endpoint we promise (docs/operations.md "Metrics"): service -> (port, path).
METRICS = {
    "gateway": (_default(GatewaySettings, "http_port"), "/metrics"),
    "preprocess": (_default(PreprocessSettings, "metrics_port"), "/metrics"),
    "inference": (_default(InferenceSettings, "metrics_port"), "/metrics"),
    "postprocess": (_default(PostprocessSettings, "metrics_port"), "/metrics"),
    "envoy": (TOPOLOGY.stats.port, "/stats/prometheus"),  # the stats listener: admin is loopback-only
}


def test_every_file_compose_builds_or_mounts_exists():
    for name, service in SERVICES.items():
        if "build" in service:
            context = DOCKER / service["build"]["context"]
            assert (context / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source}"
            else:
                assert source in COMPOSE["volumes"], f"{name}: named volume {source}"
        for dependency in service.get("depends_on", []):
            assert dependency in SERVICES, f"{name} depends on {dependency}"


def test_mesh_services_run_the_shared_image_with_their_serve_command():
    images = {SERVICES[name]["image"] for name in (*MESH, "models")}
    assert len(images) == 1 and not images.pop().endswith(":latest")
    for name in MESH:
        assert SERVICES[name]["command"] == ["serve", name]
        assert (REPO / "services" / name / "main.py").is_file()
        assert SERVICES[name]["environment"]["MESHSERVE_CATALOG"] == "/etc/meshserve/catalog.yaml"
        assert "../../catalog.yaml:/etc/meshserve/catalog.yaml:ro" in SERVICES[name]["volumes"]
    assert SERVICES["inference"]["environment"]["MESHSERVE_INFERENCE_BACKEND"] == "embedded"
    for name in ("preprocess", "inference"):  # they read the model store that `models` builds
        assert SERVICES[name]["depends_on"]["models"] == {"condition": "service_completed_successfully"}


def test_gateway_reaches_the_stages_through_envoy_and_envoy_through_compose_names():
    env = SERVICES["gateway"]["environment"]
    for name, svc in TOPOLOGY.services.items():
        if svc.kind == "grpc":
            assert env[f"MESHSERVE_GATEWAY_{name.upper()}_ADDRESS"] == f"envoy:{svc.listen.port}"
        for replica in svc.replicas:
            host, _, port = replica.rpartition(":")
            assert host in SERVICES and port in SERVICES[host]["expose"], replica
    assert TOPOLOGY.tracing.otlp.split(":")[0] in SERVICES
    assert "./envoy.yaml:/etc/envoy/envoy.yaml:ro" in SERVICES["envoy"]["volumes"]


def test_published_ports_bind_loopback_only():
    for name, service in SERVICES.items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name}: {port}"


def scrape_targets(config: dict) -> set[tuple[str, int, str]]:
    """(host, port, path) of every scrape target, static or DNS-discovered."""
    out = set()
    for job in config["scrape_configs"]:
        path = job.get("metrics_path", "/metrics")
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.rpartition(":")
                out.add((host, int(port), path))
        for dns in job.get("dns_sd_configs", []):
            out |= {(name, dns["port"], path) for name in dns["names"]}
    return out


def target_problems(targets: set[tuple[str, int, str]]) -> list[str]:
    problems = [
        f"{host}:{port} is not a compose service exposing that port"
        for host, port, _ in targets
        if host not in SERVICES or str(port) not in SERVICES[host].get("expose", [])
    ]
    problems += [
        f"{name}:{port}{path} is not scraped"
        for name, (port, path) in METRICS.items()
        if (name, port, path) not in targets
    ]
    return problems


def test_prometheus_scrapes_every_metrics_endpoint_of_a_real_service():
    assert target_problems(scrape_targets(PROMETHEUS)) == []


def test_a_wrong_scrape_target_is_caught():
    targets = scrape_targets(PROMETHEUS)
    assert target_problems(targets - {("inference", 8002, "/metrics")}) != []
    assert target_problems(targets | {("inferense", 8002, "/metrics")}) != []
    assert target_problems(targets | {("postprocess", 9101, "/metrics")}) != []


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(
            f"{name} is not installed (Debian: apt-get install {'docker-compose' if 'compose' in name else 'prometheus'})"
        )
    return path


def _compose_config(empty: Path, **env: str) -> subprocess.CompletedProcess:
    # --env-file of an empty file: a developer's deploy/docker/.env must not decide the outcome.
    (empty / "empty.env").write_text("")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MESHSERVE_")}
    return subprocess.run(
        [
            _tool("docker-compose"),
            "--env-file",
            str(empty / "empty.env"),
            "-f",
            str(DOCKER / "compose.yaml"),
            "config",
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean | env,
    )


def test_docker_compose_accepts_the_file(tmp_path):
    out = _compose_config(tmp_path, MESHSERVE_ADMIN_TOKEN="msk_admin_test", MESHSERVE_SERVICE_TOKEN="test")
    assert out.returncode == 0, out.stderr


def test_docker_compose_refuses_to_start_without_an_admin_token(tmp_path):
    out = _compose_config(tmp_path, MESHSERVE_SERVICE_TOKEN="test")
    assert out.returncode != 0 and "MESHSERVE_ADMIN_TOKEN" in out.stderr, out.stderr


def test_docker_compose_refuses_to_start_without_a_service_token(tmp_path):
    out = _compose_config(tmp_path, MESHSERVE_ADMIN_TOKEN="msk_admin_test")
    assert out.returncode != 0 and "MESHSERVE_SERVICE_TOKEN" in out.stderr, out.stderr


def test_every_stage_requires_the_service_token_and_envoy_admin_stays_on_loopback():
    wanted = "${MESHSERVE_SERVICE_TOKEN:?set MESHSERVE_SERVICE_TOKEN, see the top of this file}"
    for name in MESH:
        assert SERVICES[name]["environment"]["MESHSERVE_SERVICE_TOKEN"] == wanted, name
    assert TOPOLOGY.admin.address == "127.0.0.1"
    envoy = yaml.safe_load((DOCKER / "envoy.yaml").read_text())
    assert envoy["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    assert str(TOPOLOGY.admin.port) not in SERVICES["envoy"]["expose"]


def test_promtool_accepts_the_scrape_config():
    out = subprocess.run(
        [_tool("promtool"), "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "") for line in lines]


def stages(steps: list[tuple[str, str]]) -> list[tuple[str, list[tuple[str, str]]]]:
    out: list[tuple[str, list]] = []
    for op, args in steps:
        if op == "FROM":
            match = re.search(r"\bAS\s+(\S+)", args, re.IGNORECASE)
            out.append((match.group(1) if match else "", []))
        elif out:
            out[-1][1].append((op, args))
    return out


def dockerfile_problems(dockerfile: Path) -> list[str]:
    steps = instructions(dockerfile)
    built = stages(steps)
    problems = []
    if len(built) < 2 or not all(name for name, _ in built):
        problems.append("not a multi-stage build with named stages")
    final = built[-1][1] if built else []
    users = [args for op, args in final if op == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        problems.append("the final stage does not switch to a non-root USER")
    for index, (_, body) in enumerate(built):
        earlier = {name for name, _ in built[:index]}
        for op, args in body:
            if op == "ADD" and "://" in args:
                problems.append(f"ADD of a URL: {args}")
            if op != "COPY":
                continue
            source = re.search(r"--from=(\S+)", args)
            if source and source.group(1) not in earlier:
                problems.append(f"COPY --from={source.group(1)}: no such earlier stage")
            if not source:
                for path in args.split()[:-1]:
                    if not path.startswith("--") and not (REPO / path).exists():
                        problems.append(f"COPY {path}: not in the build context (the repository root)")
    return problems


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.triton"])
def test_dockerfiles_are_multi_stage_non_root_and_copy_what_exists(name):
    assert dockerfile_problems(DOCKER / name) == []
    assert (DOCKER / f"{name}.dockerignore").read_text().count(".venv") == 1


def test_a_root_or_single_stage_dockerfile_is_caught(tmp_path):
    text = (DOCKER / "Dockerfile").read_text()
    cases = {
        "root": text.replace("USER 10001:10001", "USER root"),
        "single-stage": "FROM python:3.11.7-slim-bookworm\nUSER 10001\n",
        "missing-source": text.replace("COPY gen /opt/meshserve/gen", "COPY generated /opt/meshserve/gen"),
        "bad-stage": text.replace("--from=build /opt/venv", "--from=builder /opt/venv"),
    }
    for case, broken in cases.items():
        path = tmp_path / case
        path.write_text(broken)
        assert dockerfile_problems(path) != [], case


def test_cpu_image_installs_cpu_torch_first_at_the_pinned_version():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d.split(";")[0].split("#")[0].strip() for d in dependencies if d.startswith("torch=="))
    installs = [args for op, args in instructions(DOCKER / "Dockerfile") if op == "RUN" and "pip install" in args]
    assert pin in installs[0].split() and "--index-url https://download.pytorch.org/whl/cpu" in installs[0]
    final = stages(instructions(DOCKER / "Dockerfile"))[-1][1]
    assert ("ENTRYPOINT", '["meshserve"]') in final


# --- the gateway's control plane ----------------------------------------------------------------

REQUIRED = re.compile(r"^\$\{(MESHSERVE_ADMIN_TOKEN):\?[^}]+\}$")  # ${VAR:?message}: no default, required
PASSWORD = re.compile(r"^\$\{(MESHSERVE_POSTGRES_PASSWORD):-([^}]*dev-only[^}]*)\}$")  # a marked dev default
DATABASE = re.compile(r"^postgresql\+psycopg://([^:@/]+):([^@]+)@([a-z0-9-]+):(\d+)/(\w+)$")
REDIS = re.compile(r"^redis://([a-z0-9-]+):(\d+)/(\d+)$")
CONTROL_PLANE_ENV = ("MESHSERVE_ADMIN_TOKEN", "MESHSERVE_GATEWAY_DATABASE_URL", "MESHSERVE_GATEWAY_REDIS_URL")


def _exposes(compose: dict, host: str, port: str) -> bool:
    return host in compose["services"] and port in compose["services"][host].get("expose", [])


def control_plane_problems(compose: dict) -> list[str]:
    """The gateway: a required admin token from the environment, Postgres and Redis services of this
    file (healthy before it starts), credentials only as ${VARIABLES}; no other service gets them."""
    services = compose["services"]
    gateway = services.get("gateway", {})
    env = gateway.get("environment", {})
    problems = []
    if not REQUIRED.match(str(env.get("MESHSERVE_ADMIN_TOKEN", ""))):
        problems.append(f"gateway: MESHSERVE_ADMIN_TOKEN is {env.get('MESHSERVE_ADMIN_TOKEN')!r}, not ${{...:?...}}")
    if str(env.get("MESHSERVE_GATEWAY_AUTH", "true")).lower() != "true":
        problems.append("gateway: authentication is off")
    database = DATABASE.match(str(env.get("MESHSERVE_GATEWAY_DATABASE_URL", "")))
    postgres = services.get("postgres", {})
    pg_env = postgres.get("environment", {})
    if database is None:
        problems.append(
            f"gateway: database URL {env.get('MESHSERVE_GATEWAY_DATABASE_URL')!r} is not postgresql+psycopg"
        )
    else:
        user, password, host, port, db = database.groups()
        if not _exposes(compose, host, port) or not postgres.get("image", "").startswith("postgres:"):
            problems.append(f"gateway: database {host}:{port} is not this file's Postgres")
        if (user, db) != (pg_env.get("POSTGRES_USER"), pg_env.get("POSTGRES_DB")):
            problems.append(f"gateway: database user/db {user}/{db} are not Postgres' own")
        if not PASSWORD.match(password) or password != pg_env.get("POSTGRES_PASSWORD"):
            problems.append(f"gateway: database password {password!r} is not Postgres' ${{...:-...dev-only...}}")
    if not any(volume.split(":")[-1] == "/var/lib/postgresql/data" for volume in postgres.get("volumes", [])):
        problems.append("postgres: its data is not on a named volume")
    redis = REDIS.match(str(env.get("MESHSERVE_GATEWAY_REDIS_URL", "")))
    if redis is None or not _exposes(compose, redis.group(1), redis.group(2)):
        problems.append(f"gateway: Redis URL {env.get('MESHSERVE_GATEWAY_REDIS_URL')!r} is not a service of this file")
    depends = gateway.get("depends_on", {})
    for name in ("postgres", "redis"):
        if not isinstance(depends, dict) or depends.get(name) != {"condition": "service_healthy"}:
            problems.append(f"gateway: does not wait for {name} to be healthy")
        if "healthcheck" not in services.get(name, {}):
            problems.append(f"{name}: no healthcheck")
    for name, service in services.items():
        if name != "gateway" and isinstance(service.get("environment"), dict):
            problems += [f"{name}: gets {v}" for v in CONTROL_PLANE_ENV if v in service["environment"]]
    scraped = any(host == "gateway" for host, _, _ in scrape_targets(PROMETHEUS))
    if scraped and str(env.get("MESHSERVE_GATEWAY_METRICS_PUBLIC", "true")).lower() != "true":
        problems.append("gateway: Prometheus scrapes /metrics without a token, but it needs one")
    return problems


def test_gateway_gets_a_required_admin_token_postgres_and_redis():
    assert control_plane_problems(COMPOSE) == []
    assert SERVICES["postgres"]["image"].startswith("postgres:16")
    assert SERVICES["redis"]["image"].startswith("redis:7")
    command = SERVICES["redis"]["command"]
    assert command[command.index("--save") + 1] == "" and command[command.index("--appendonly") + 1] == "no"


def _gateway_env(compose: dict) -> dict:
    return compose["services"]["gateway"]["environment"]


COMPOSE_BREAKS = {
    "no-admin-token": lambda c: _gateway_env(c).pop("MESHSERVE_ADMIN_TOKEN"),
    "literal-admin-token": lambda c: _gateway_env(c).update(MESHSERVE_ADMIN_TOKEN="msk_admin_0123456789abcdef"),
    "defaulted-admin-token": lambda c: _gateway_env(c).update(MESHSERVE_ADMIN_TOKEN="${MESHSERVE_ADMIN_TOKEN:-x}"),
    "sqlite": lambda c: _gateway_env(c).update(MESHSERVE_GATEWAY_DATABASE_URL="sqlite:////var/lib/meshserve/g.db"),
    "literal-password": lambda c: _gateway_env(c).update(
        MESHSERVE_GATEWAY_DATABASE_URL="postgresql+psycopg://meshserve:hunter2@postgres:5432/meshserve"
    ),
    "unmarked-default": lambda c: c["services"]["postgres"]["environment"].update(
        POSTGRES_PASSWORD="${MESHSERVE_POSTGRES_PASSWORD:-meshserve}"
    ),
    "no-postgres-volume": lambda c: c["services"]["postgres"].pop("volumes"),
    "no-redis": lambda c: _gateway_env(c).pop("MESHSERVE_GATEWAY_REDIS_URL"),
    "redis-unknown-host": lambda c: _gateway_env(c).update(MESHSERVE_GATEWAY_REDIS_URL="redis://cache:6379/0"),
    "no-wait": lambda c: c["services"]["gateway"].update(depends_on=["envoy", "redis", "postgres"]),
    "no-healthcheck": lambda c: c["services"]["redis"].pop("healthcheck"),
    "token-to-a-stage": lambda c: c["services"]["inference"]["environment"].update(MESHSERVE_ADMIN_TOKEN="x"),
    "auth-off": lambda c: _gateway_env(c).update(MESHSERVE_GATEWAY_AUTH="false"),
    "metrics-private": lambda c: _gateway_env(c).update(MESHSERVE_GATEWAY_METRICS_PUBLIC="false"),
}


@pytest.mark.parametrize("case", COMPOSE_BREAKS, ids=str)
def test_a_gateway_without_its_control_plane_or_with_a_literal_secret_is_caught(case):
    compose = copy.deepcopy(COMPOSE)
    COMPOSE_BREAKS[case](compose)
    assert control_plane_problems(compose) != []


def test_no_credential_is_committed_in_the_docker_files_and_env_files_stay_out():
    files = [p for p in DOCKER.rglob("*") if p.is_file() and p.suffix != ".json" and p.name != ".env"]
    assert committed_secret_problems(files) == []
    example = dict(
        line.split("=", 1)
        for line in (DOCKER / ".env.example").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert example == {"MESHSERVE_ADMIN_TOKEN": "", "MESHSERVE_SERVICE_TOKEN": "", "MESHSERVE_POSTGRES_PASSWORD": ""}
    # Never committed, never in an image (both Dockerfiles copy deploy/ into the image).
    assert ".env" in (DOCKER / ".gitignore").read_text().split()
    for name in ("Dockerfile", "Dockerfile.triton"):
        assert "**/.env" in (DOCKER / f"{name}.dockerignore").read_text().split()


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        line = line.split("#")[0].removesuffix("\\").strip()  # `name==version \` then its hash lines
        if "==" in line and not line.startswith("-"):
            name, version = line.split(";")[0].split("==")
            pins[canonicalize_name(name.split("[")[0])] = version.strip()
    return pins


def _closure(requirements: list[str]) -> set[str]:
    """Every distribution the requirements pull in, extras included (markers of this interpreter)."""
    seen: set[tuple[str, frozenset]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for text in metadata.distribution(req.name).requires or []:
            dep = Requirement(text)
            if dep.marker is None or any(dep.marker.evaluate({"extra": e}) for e in ("", *req.extras)):
                todo.append(dep)
    return {name for name, _ in seen}


def test_the_image_installs_the_control_planes_dependencies_pinned_by_the_lock():
    """The Dockerfile installs pyproject's dependencies and its [redis], [postgres] and [tiktoken] extras with
    requirements.lock as constraints: the control plane's (SQLAlchemy, psycopg with its binary build,
    redis with hiredis, cachetools) are among them, and every distribution they pull in has a pin, so
    the image gets the tested versions."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    dependencies = project["dependencies"] + extras["redis"] + extras["postgres"] + extras["tiktoken"]
    direct = {canonicalize_name(Requirement(d).name): Requirement(d) for d in dependencies}
    lock = _lock()
    for name in ("sqlalchemy", "psycopg", "redis", "hiredis", "cachetools"):
        assert name in direct, f"{name} is not in pyproject's dependencies"
        pinned = str(direct[name].specifier).removeprefix("==")
        assert lock.get(name) == pinned, f"{name}: pyproject {pinned}, lock {lock.get(name)}"
    assert "binary" in direct["psycopg"].extras and lock.get("psycopg-binary") == lock["psycopg"]
    closure = _closure(dependencies)
    assert {"sqlalchemy", "psycopg-binary", "redis", "hiredis", "cachetools"} <= closure
    # torch: the lock leaves it out (installed first, from the CPU index); setuptools: `python -m venv` has it.
    assert sorted(closure - set(lock) - {"setuptools", "torch"}) == []
    installs = [args for op, args in instructions(DOCKER / "Dockerfile") if op == "RUN" and "pip install" in args]
    assert any(
        "p['dependencies'] + x['redis'] + x['postgres'] + x['tiktoken']" in a
        and "-c /opt/meshserve/requirements.lock" in a
        for a in installs
    )
