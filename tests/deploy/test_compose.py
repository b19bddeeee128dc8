"""deploy/docker without a Docker engine: the compose file, Prometheus' scrape config and the
Dockerfiles are checked offline against the files, services and ports they name. Where Debian's
docker-compose (1.29) or promtool is on PATH, the real tool validates the file as well."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from deploy.envoy.generate import Topology
from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.postprocess.settings import PostprocessSettings
from services.preprocess.settings import PreprocessSettings
from tests.deploy.manifests import MESH, REPO

DOCKER = REPO / "deploy" / "docker"
COMPOSE = yaml.safe_load((DOCKER / "compose.yaml").read_text())
SERVICES = COMPOSE["services"]
PROMETHEUS = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
TOPOLOGY = Topology.model_validate(yaml.safe_load((DOCKER / "topology.compose.yaml").read_text()))


def _default(settings, field: str) -> int:
    return settings.model_fields[field].default


# Every metrics endpoint we promise (README "Observability"): service -> (port, path).
METRICS = {
    "gateway": (_default(GatewaySettings, "http_port"), "/metrics"),
    "preprocess": (_default(PreprocessSettings, "metrics_port"), "/metrics"),
    "inference": (_default(InferenceSettings, "metrics_port"), "/metrics"),
    "postprocess": (_default(PostprocessSettings, "metrics_port"), "/metrics"),
    "envoy": (TOPOLOGY.admin.port, "/stats/prometheus"),
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


def test_docker_compose_accepts_the_file():
    out = subprocess.run(
        [_tool("docker-compose"), "-f", str(DOCKER / "compose.yaml"), "config", "-q"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr


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
    pin = next(line for line in (REPO / "requirements.in").read_text().splitlines() if line.startswith("torch=="))
    installs = [args for op, args in instructions(DOCKER / "Dockerfile") if op == "RUN" and "pip install" in args]
    assert pin in installs[0].split() and "--index-url https://download.pytorch.org/whl/cpu" in installs[0]
    final = stages(instructions(DOCKER / "Dockerfile"))[-1][1]
    assert ("ENTRYPOINT", '["meshserve"]') in final
