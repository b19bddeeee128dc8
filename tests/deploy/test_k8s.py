"""The kustomize overlays, rendered by the real `kubectl kustomize` and validated offline with
kubernetes-validate's strict schemas, plus the checks schemas cannot make (tests/deploy/manifests.py).
Every check is also shown failing on a deliberately broken copy of the real render."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from deploy.envoy.generate import Topology, render
from services.gateway.settings import GatewaySettings
from services.inference.settings import InferenceSettings
from services.inference.triton_launcher import command, restricted_protocol_flags
from services.postprocess.settings import PostprocessSettings
from services.preprocess.settings import PreprocessSettings
from tests.deploy.manifests import (
    K8S_VERSIONS,
    OVERLAYS,
    REPO,
    catalog_problems,
    committed_secret_problems,
    containers,
    control_plane_problems,
    find,
    hardening_problems,
    mesh_container,
    network_policy_problems,
    probe_problems,
    reference_problems,
    schema_problems,
    secret_problems,
    service_token_problems,
    topology_problems,
)
from tests.deploy.manifests import (
    render as kustomize,
)

TOPOLOGY = Topology.model_validate(yaml.safe_load((REPO / "deploy/envoy/topology.k8s.yaml").read_text()))
# The ports the services listen on by default (their settings), which the manifests must match.
GRPC_PORTS = {
    "gateway": GatewaySettings.model_fields["http_port"].default,
    "preprocess": PreprocessSettings.model_fields["grpc_port"].default,
    "inference": InferenceSettings.model_fields["grpc_port"].default,
    "postprocess": PostprocessSettings.model_fields["grpc_port"].default,
}


@pytest.fixture(scope="module", params=["cpu", "gpu"])
def rendered(request) -> tuple[str, list[dict]]:
    return request.param, kustomize(OVERLAYS / request.param)


def deployment_pod(docs: list[dict], name: str) -> dict:
    return find(docs, "Deployment", name)["spec"]["template"]["spec"]


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_overlays_pass_strict_schemas(rendered, version):
    _, docs = rendered
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap"} <= kinds
    assert schema_problems(docs, version) == []


def test_the_validate_cli_passes_our_render_and_would_pass_an_unknown_api_version(rendered, tmp_path):
    """Why the tests call the API: `kubernetes-validate --strict` exits 0 on a kind it has no schema for."""
    _, docs = rendered
    cli = [str(Path(sys.executable).parent / "kubernetes-validate"), "--strict", "--quiet", "-k", K8S_VERSIONS[0]]
    good = tmp_path / "rendered.yaml"
    good.write_text(yaml.safe_dump_all(docs))
    assert subprocess.run([*cli, str(good)], capture_output=True, timeout=60).returncode == 0
    hpa = copy.deepcopy(find(docs, "HorizontalPodAutoscaler", "inference"))
    hpa["apiVersion"] = "autoscaling/v2beta1"
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump(hpa))
    assert subprocess.run([*cli, str(old)], capture_output=True, timeout=60).returncode == 0
    assert schema_problems([hpa], K8S_VERSIONS[0]) != []


def _set_env(deployment: dict, name: str, value: str) -> None:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    next(e for e in container["env"] if e["name"] == name)["value"] = value


def _broken(docs: list[dict], kind: str, name: str, breaks) -> list[dict]:
    docs = copy.deepcopy(docs)
    breaks(find(docs, kind, name))
    return docs


SCHEMA_BREAKS = {
    "unknown-field": ("Deployment", "inference", lambda d: d["spec"].update(replica=2)),
    "wrong-type": ("Deployment", "gateway", lambda d: d["spec"].update(replicas="two")),
    "missing-containers": ("Deployment", "preprocess", lambda d: d["spec"]["template"]["spec"].pop("containers")),
    "removed-api-version": (
        "HorizontalPodAutoscaler",
        "inference",
        lambda d: d.update(apiVersion="autoscaling/v2beta1"),
    ),
    "unknown-kind": ("PodDisruptionBudget", "gateway", lambda d: d.update(kind="PodDisruptionBudgett")),
    "string-port": ("Service", "inference", lambda d: d["spec"]["ports"][0].update(port="grpc")),
}


@pytest.mark.parametrize("case", SCHEMA_BREAKS, ids=str)
def test_a_broken_manifest_fails_the_schema_check(rendered, case):
    _, docs = rendered
    kind, name, breaks = SCHEMA_BREAKS[case]
    assert schema_problems(_broken(docs, kind, name, breaks), K8S_VERSIONS[0]) != []


def test_references_between_objects_resolve(rendered):
    _, docs = rendered
    assert reference_problems(docs) == []


REFERENCE_BREAKS = {
    "hpa-target": ("HorizontalPodAutoscaler", "preprocess", lambda d: d["spec"]["scaleTargetRef"].update(name="pre")),
    "service-selector": (
        "Service",
        "inference",
        lambda d: d["spec"]["selector"].update({"app.kubernetes.io/component": "x"}),
    ),
    "target-port": ("Service", "postprocess", lambda d: d["spec"]["ports"][0].update(targetPort="grcp")),
    "configmap": (
        "Deployment",
        "envoy",
        lambda d: d["spec"]["template"]["spec"]["volumes"][0]["configMap"].update(name="nope"),
    ),
    "pdb-selector": ("PodDisruptionBudget", "envoy", lambda d: d["spec"]["selector"]["matchLabels"].update(x="y")),
    "networkpolicy-peer": (
        "NetworkPolicy",
        "redis",
        lambda d: d["spec"]["ingress"][0]["from"][0]["podSelector"]["matchLabels"].update(
            {"app.kubernetes.io/component": "gatway"}
        ),
    ),
}


@pytest.mark.parametrize("case", REFERENCE_BREAKS, ids=str)
def test_a_dangling_reference_is_caught(rendered, case):
    _, docs = rendered
    kind, name, breaks = REFERENCE_BREAKS[case]
    assert reference_problems(_broken(docs, kind, name, breaks)) != []


def test_every_container_is_hardened_and_pinned(rendered):
    _, docs = rendered
    assert hardening_problems(docs) == []


HARDENING_BREAKS = {
    "no-limits": lambda pod: pod["containers"][0]["resources"].pop("limits"),
    "root": lambda pod: pod["securityContext"].update(runAsNonRoot=False),
    "writable-root": lambda pod: pod["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False),
    "escalation": lambda pod: pod["initContainers"][0]["securityContext"].pop("allowPrivilegeEscalation"),
    "latest": lambda pod: pod["containers"][0].update(image="meshserve:latest"),
}


@pytest.mark.parametrize("case", HARDENING_BREAKS, ids=str)
def test_a_weakened_pod_is_caught(rendered, case):
    _, docs = rendered
    docs = _broken(docs, "Deployment", "preprocess", lambda d: HARDENING_BREAKS[case](d["spec"]["template"]["spec"]))
    assert hardening_problems(docs) != []


def test_meshserve_catalog_points_at_the_mounted_configmap_of_our_catalog(rendered):
    _, docs = rendered
    assert catalog_problems(docs) == []
    catalog = next(
        d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("meshserve-catalog")
    )
    assert catalog["data"]["catalog.yaml"] == (REPO / "catalog.yaml").read_text()
    moved = _broken(docs, "Deployment", "gateway", lambda d: _set_env(d, "MESHSERVE_CATALOG", "/etc/catalog.yaml"))
    assert catalog_problems(moved) != []


def test_probes_use_the_grpc_health_service_and_the_gateway_http_checks(rendered):
    _, docs = rendered
    assert probe_problems(docs, GRPC_PORTS) == []
    moved = _broken(
        docs,
        "Deployment",
        "postprocess",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["livenessProbe"].update(grpc={"port": 9102}),
    )
    assert probe_problems(moved, GRPC_PORTS) != []


def test_services_and_addresses_match_the_envoy_topology(rendered):
    _, docs = rendered
    assert topology_problems(docs, TOPOLOGY) == []
    clusterip = _broken(docs, "Service", "inference", lambda d: d["spec"].pop("clusterIP"))
    assert topology_problems(clusterip, TOPOLOGY) != []
    direct = _broken(
        docs, "Deployment", "gateway", lambda d: _set_env(d, "MESHSERVE_GATEWAY_INFERENCE_ADDRESS", "inference:8001")
    )
    assert topology_problems(direct, TOPOLOGY) != []


def test_envoy_configmap_is_the_generators_output_for_the_k8s_topology(rendered):
    _, docs = rendered
    config = next(d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("envoy-config"))
    assert config["data"]["envoy.yaml"] == render(REPO / "deploy/envoy/topology.k8s.yaml")
    volume = deployment_pod(docs, "envoy")["volumes"][0]
    assert volume["configMap"]["name"] == config["metadata"]["name"]


def test_cpu_overlay_runs_the_embedded_backend_without_gpus():
    docs = kustomize(OVERLAYS / "cpu")
    env = {e["name"]: e.get("value") for e in mesh_container(docs, "inference")["env"]}
    assert env["MESHSERVE_INFERENCE_BACKEND"] == "embedded"
    assert mesh_container(docs, "inference")["args"] == ["serve", "inference"]
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(docs)


def _flags(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args if a.startswith("--") and "=" in a)


def test_gpu_overlay_serves_the_generated_repository_with_the_launchers_arguments():
    docs = kustomize(OVERLAYS / "gpu")
    pod = deployment_pod(docs, "inference")
    triton = mesh_container(docs, "inference")
    assert triton["image"].startswith("meshserve-triton:") and triton["command"] == ["tritonserver"]
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["nodeSelector"] and any(t["key"] == "nvidia.com/gpu" for t in pod["tolerations"])
    # The arguments our launcher gives tritonserver, bound to every interface on the default ports.
    settings = InferenceSettings(host="0.0.0.0", triton_binary=Path("/opt/tritonserver/bin/tritonserver"))
    launcher = _flags(command(settings, Path("/repository"), Path("/backends")))
    flags = _flags(triton["args"])
    # --backend-config names the Python backend's shm regions after the launcher's pid (so that two
    # Tritons on one host never remove each other's); a pod runs one Triton and keeps the default.
    ours = {"--model-repository", "--backend-directory", "--allow-gpu-metrics", "--backend-config"}
    for flag in set(launcher) - ours:
        assert flags.get(flag) == launcher[flag], flag
    # The repository tritonserver serves is the one the init container writes, on a shared volume.
    writer = next(c for c in pod["initContainers"] if c["name"] == "triton-repository")
    assert writer["image"].startswith("meshserve:")
    out = writer["args"][writer["args"].index("--out") + 1]
    assert flags["--model-repository"] == out
    builder = next(c for c in pod["initContainers"] if c["name"] == "models")
    assert builder["args"] == ["models", "build"]
    home = {e["name"]: e["value"] for e in writer["env"]}["MESHSERVE_HOME"]
    for c in (writer, builder, triton):
        mount = next(m for m in c["volumeMounts"] if m["name"] == "home")
        assert mount["mountPath"] == home and out.startswith(home + "/")
    assert next(v for v in pod["volumes"] if v["name"] == "home")["emptyDir"] is not None
    assert any(m["mountPath"] == "/dev/shm" for m in triton["volumeMounts"])
    assert {c["name"] for c in containers(pod)} == {"models", "triton-repository", "inference"}


def _gateway_env(docs: list[dict]) -> dict[str, dict]:
    return {e["name"]: e for e in mesh_container(docs, "gateway")["env"]}


def test_gateway_replicas_share_the_admin_token_database_and_redis(rendered):
    _, docs = rendered
    assert control_plane_problems(docs) == []
    env = _gateway_env(docs)
    assert env["MESHSERVE_ADMIN_TOKEN"]["valueFrom"] == {"secretKeyRef": {"name": "meshserve-admin", "key": "token"}}
    assert env["MESHSERVE_GATEWAY_DATABASE_URL"]["valueFrom"] == {
        "secretKeyRef": {"name": "meshserve-database", "key": "url"}
    }
    assert env["MESHSERVE_GATEWAY_REDIS_URL"]["value"] == "redis://redis:6379/0"
    # The field the gateway reads them into (pydantic-settings aliases), so a rename fails here.
    fields = GatewaySettings.model_fields
    assert "MESHSERVE_ADMIN_TOKEN" in fields["admin_token"].validation_alias.choices
    assert {"database_url", "redis_url", "auth", "metrics_public"} <= set(fields)
    redis = find(docs, "Deployment", "redis")["spec"]["template"]["spec"]["containers"][0]
    # Ephemeral by design (docs/deployment.md "Secrets, database and Redis" says what losing it means).
    args = redis["args"]
    assert args[args.index("--save") + 1] == "" and args[args.index("--appendonly") + 1] == "no"


def _pop_env(name):
    def breaks(d):
        c = d["spec"]["template"]["spec"]["containers"][0]
        c["env"] = [e for e in c["env"] if e["name"] != name]

    return breaks


def _replace_env(name, **entry):
    def breaks(d):
        _pop_env(name)(d)
        d["spec"]["template"]["spec"]["containers"][0]["env"].append({"name": name, **entry})

    return breaks


CONTROL_PLANE_BREAKS = {
    "no-admin-token": ("Deployment", "gateway", _pop_env("MESHSERVE_ADMIN_TOKEN")),
    "no-database": ("Deployment", "gateway", _pop_env("MESHSERVE_GATEWAY_DATABASE_URL")),
    "no-redis": ("Deployment", "gateway", _pop_env("MESHSERVE_GATEWAY_REDIS_URL")),
    "redis-in-process": ("Deployment", "gateway", _replace_env("MESHSERVE_GATEWAY_REDIS_URL", value="memory://")),
    "redis-unknown-host": (
        "Deployment",
        "gateway",
        _replace_env("MESHSERVE_GATEWAY_REDIS_URL", value="redis://cache:6379/0"),
    ),
    "redis-wrong-port": ("Service", "redis", lambda d: d["spec"]["ports"][0].update(port=6380)),
    "redis-two-pods": ("Deployment", "redis", lambda d: d["spec"].update(replicas=2)),
    "redis-no-data-volume": (
        "Deployment",
        "redis",
        lambda d: d["spec"]["template"]["spec"]["containers"][0].pop("volumeMounts"),
    ),
    "auth-off": ("Deployment", "gateway", _replace_env("MESHSERVE_GATEWAY_AUTH", value="false")),
    "metrics-private-but-scraped": (
        "Deployment",
        "gateway",
        _replace_env("MESHSERVE_GATEWAY_METRICS_PUBLIC", value="false"),
    ),
    "other-secret": (
        "Deployment",
        "gateway",
        _replace_env("MESHSERVE_ADMIN_TOKEN", valueFrom={"secretKeyRef": {"name": "admin", "key": "token"}}),
    ),
}


@pytest.mark.parametrize("case", CONTROL_PLANE_BREAKS, ids=str)
def test_a_gateway_without_the_shared_control_plane_is_caught(rendered, case):
    _, docs = rendered
    kind, name, breaks = CONTROL_PLANE_BREAKS[case]
    assert control_plane_problems(_broken(docs, kind, name, breaks)) != []


def test_no_secret_is_shipped_and_credentials_come_from_secrets(rendered):
    _, docs = rendered
    assert secret_problems(docs) == []
    assert not any(d["kind"] == "Secret" for d in docs)


SECRET_BREAKS = {
    "literal-admin-token": _replace_env("MESHSERVE_ADMIN_TOKEN", value="correct-horse-battery-staple"),
    "literal-database-url": _replace_env("MESHSERVE_GATEWAY_DATABASE_URL", value="sqlite:////tmp/gateway.db"),
    "password-in-url": _replace_env("MESHSERVE_GATEWAY_REDIS_URL", value="redis://default:hunter2hunter2@redis:6379/0"),
    "token-in-args": lambda d: d["spec"]["template"]["spec"]["containers"][0]["args"].append(
        "--token=msk_admin_3f9a0c1d2e4b5a6978c0d1e2f3a4b5c6"
    ),
    "typo-secret": _replace_env(
        "MESHSERVE_GATEWAY_DATABASE_URL", valueFrom={"secretKeyRef": {"name": "meshserve-db", "key": "url"}}
    ),
    "optional-secret": _replace_env(
        "MESHSERVE_ADMIN_TOKEN",
        valueFrom={"secretKeyRef": {"name": "meshserve-admin", "key": "token", "optional": True}},
    ),
    "other-alias": _replace_env("MESHSERVE_GATEWAY_ADMIN_TOKEN", value="x"),
    "env-from-configmap": lambda d: d["spec"]["template"]["spec"]["containers"][0].update(
        envFrom=[{"configMapRef": {"name": "gateway-env"}}]
    ),
}


@pytest.mark.parametrize("case", SECRET_BREAKS, ids=str)
def test_a_committed_credential_is_caught(rendered, case):
    _, docs = rendered
    assert secret_problems(_broken(docs, "Deployment", "gateway", SECRET_BREAKS[case])) != []


def test_a_shipped_secret_or_a_token_in_a_configmap_is_caught(rendered):
    _, docs = rendered
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "meshserve-admin", "namespace": "meshserve"},
        "stringData": {"token": "change-me"},
    }
    assert secret_problems([*docs, secret]) != []
    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "gateway-env", "namespace": "meshserve"},
        "data": {"MESHSERVE_ADMIN_TOKEN": "change-me"},
    }
    assert secret_problems([*docs, configmap]) != []


K8S_FILES = sorted((REPO / "deploy" / "k8s").rglob("*.yaml"))


def test_no_credential_is_committed_in_the_k8s_files():
    assert K8S_FILES and committed_secret_problems(K8S_FILES) == []


def test_a_committed_token_password_or_secret_generator_is_caught(tmp_path):
    cases = {
        "token.yaml": "# MESHSERVE_ADMIN_TOKEN=msk_admin_Zm9vYmFyYmF6cXV4cXV1eA\n",
        "url.yaml": "url: postgresql+psycopg://meshserve:s3cret-pw@db:5432/meshserve\n",
        "kustomization.yaml": "secretGenerator:\n  - name: meshserve-admin\n    literals: [token=change-me]\n",
    }
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        assert committed_secret_problems([tmp_path / name]) != [], name
    placeholder = tmp_path / "placeholder.yaml"
    placeholder.write_text(
        'token="msk_admin_$(openssl rand -hex 32)" url=postgresql+psycopg://meshserve:PASSWORD@HOST:5432/meshserve\n'
    )
    assert committed_secret_problems([placeholder]) == []


# --- issue 14 finding 2: each stage accepts only its callers, and only with the service token -----

# (component, port) -> who may connect: the stages only through Envoy, Envoy's stage listeners only
# from the gateway (deploy/envoy/topology.k8s.yaml: the gateway calls the stages through Envoy).
CALLERS = {
    **{(stage, GRPC_PORTS[stage]): {"envoy"} for stage in ("preprocess", "inference", "postprocess")},
    **{
        ("envoy", TOPOLOGY.services[stage].listen.port): {"gateway"}
        for stage in ("preprocess", "inference", "postprocess")
    },
}


def test_every_grpc_stage_and_envoys_stage_listeners_accept_only_their_callers(rendered):
    _, docs = rendered
    assert network_policy_problems(docs, CALLERS) == []
    # Prometheus (another namespace) reaches only the metrics ports, never a gRPC port.
    for policy in (d for d in docs if d["kind"] == "NetworkPolicy"):
        for rule in policy["spec"]["ingress"]:
            if any("namespaceSelector" in peer for peer in rule.get("from", [])):
                assert {p["port"] for p in rule["ports"]} <= {9101, 8002, 9102, 9902}, policy["metadata"]["name"]


def _open_rule(d):
    d["spec"]["ingress"].append({"ports": [{"protocol": "TCP", "port": 8001}]})


POLICY_BREAKS = {
    "no-policy": lambda docs: [d for d in docs if (d["kind"], d["metadata"]["name"]) != ("NetworkPolicy", "inference")],
    "open-rule": lambda docs: _broken(docs, "NetworkPolicy", "inference", _open_rule),
    "all-ports-to-gateway": lambda docs: _broken(
        docs,
        "NetworkPolicy",
        "preprocess",
        lambda d: d["spec"]["ingress"].append(
            {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/component": "gateway"}}}]}
        ),
    ),
    "ip-block": lambda docs: _broken(
        docs,
        "NetworkPolicy",
        "envoy",
        lambda d: d["spec"]["ingress"][1]["from"].append({"ipBlock": {"cidr": "0.0.0.0/0"}}),
    ),
    "any-namespace": lambda docs: _broken(
        docs,
        "NetworkPolicy",
        "postprocess",
        lambda d: d["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}}),
    ),
}


@pytest.mark.parametrize("case", POLICY_BREAKS, ids=str)
def test_a_stage_open_to_other_callers_is_caught(rendered, case):
    _, docs = rendered
    assert network_policy_problems(POLICY_BREAKS[case](docs), CALLERS) != []


def test_every_stage_and_the_gateway_read_the_service_token_from_the_secret(rendered):
    _, docs = rendered
    assert service_token_problems(docs) == []
    assert secret_problems(docs) == []


TOKEN_BREAKS = {
    "missing": ("postprocess", _pop_env("MESHSERVE_SERVICE_TOKEN")),
    "literal": ("preprocess", _replace_env("MESHSERVE_SERVICE_TOKEN", value="change-me")),
    "other-secret": (
        "gateway",
        _replace_env(
            "MESHSERVE_SERVICE_TOKEN", valueFrom={"secretKeyRef": {"name": "meshserve-admin", "key": "token"}}
        ),
    ),
}


@pytest.mark.parametrize("case", TOKEN_BREAKS, ids=str)
def test_a_stage_without_the_service_token_is_caught(rendered, case):
    _, docs = rendered
    name, breaks = TOKEN_BREAKS[case]
    broken = _broken(docs, "Deployment", name, breaks)
    assert service_token_problems(broken) != [] or secret_problems(broken) != []


def test_triton_checks_the_service_token_with_the_launchers_flag():
    docs = kustomize(OVERLAYS / "gpu")
    triton = mesh_container(docs, "inference")
    assert restricted_protocol_flags("$(MESHSERVE_SERVICE_TOKEN)")[0] in triton["args"]
    assert service_token_problems(docs) == []
    without = _broken(
        docs,
        "Deployment",
        "inference",
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["args"].pop(),
    )
    assert service_token_problems(without) != []


def test_envoy_admin_listens_on_loopback_and_prometheus_gets_only_the_stats_listener(rendered):
    _, docs = rendered
    config = yaml.safe_load(find(docs, "ConfigMap", next(
        d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"].startswith("envoy-config")
    ))["data"]["envoy.yaml"])  # fmt: skip
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    envoy = find(docs, "Deployment", "envoy")["spec"]["template"]
    assert envoy["metadata"]["annotations"]["prometheus.io/port"] == str(TOPOLOGY.stats.port)
    assert TOPOLOGY.admin.port not in {p["containerPort"] for p in envoy["spec"]["containers"][0]["ports"]}
