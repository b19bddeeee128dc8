"""Rendering and checking the Kubernetes manifests offline.

`render` runs the real `kubectl kustomize`. `schema_problems` validates every object with
kubernetes-validate's strict schemas and also reports objects it has no schema for (an unknown
kind or a removed apiVersion such as autoscaling/v2beta1): its CLI only warns on those and exits 0,
even with --strict. The other checks are what schemas cannot see: references between objects, the
pod hardening we promise, and agreement with the topology Envoy is generated from. Each returns a
list of problems (empty = fine), so that a test can show a broken manifest is caught.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[2]
KUBECTL = Path(sys.executable).parent / "kubectl"
OVERLAYS = REPO / "deploy" / "k8s" / "overlays"
# The oldest release with lifecycle.preStop.sleep on by default, and the newest schemas shipped.
K8S_VERSIONS = ("1.30.0", "1.37.0")
MESH = ("gateway", "preprocess", "inference", "postprocess")


def render(folder: Path) -> list[dict]:
    # LoadRestrictionsNone: the catalog ConfigMap is made from the repository's catalog.yaml.
    out = subprocess.run(
        [str(KUBECTL), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(folder)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0:
        raise AssertionError(f"kubectl kustomize {folder} failed: {out.stderr}")
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def name_of(doc: dict) -> str:
    return f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


def schema_problems(docs: list[dict], version: str) -> list[str]:
    problems = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError as exc:
            problems.append(f"{name_of(doc)}: no schema: {exc.message}")
        except kubernetes_validate.ValidationError as exc:
            problems.append(f"{name_of(doc)}: {'.'.join(map(str, exc.path))}: {exc.message}")
    return problems


def find(docs: list[dict], kind: str, name: str) -> dict | None:
    return next((d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name), None)


def deployments(docs: list[dict]) -> Iterator[dict]:
    return (d for d in docs if d["kind"] == "Deployment")


def containers(pod: dict) -> list[dict]:
    return [*pod.get("initContainers", []), *pod["containers"]]


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pods_selected(docs: list[dict], selector: dict) -> list[dict]:
    return [d for d in deployments(docs) if selects(selector, d["spec"]["template"]["metadata"].get("labels", {}))]


def reference_problems(docs: list[dict]) -> list[str]:
    """Selectors, HPA targets, Service target ports, volumes and ConfigMaps resolve."""
    problems = []
    configmaps = {d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"}
    for d in deployments(docs):
        spec = d["spec"]
        if not selects(spec["selector"]["matchLabels"], spec["template"]["metadata"].get("labels", {})):
            problems.append(f"{name_of(d)}: selector does not match its pod labels")
        pod = spec["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for v in volumes.values():
            if "configMap" in v and v["configMap"]["name"] not in configmaps:
                problems.append(f"{name_of(d)}: volume {v['name']} names a missing ConfigMap {v['configMap']['name']}")
        for c in containers(pod):
            for m in c.get("volumeMounts", []):
                if m["name"] not in volumes:
                    problems.append(f"{name_of(d)}/{c['name']}: mounts an undefined volume {m['name']}")
    for d in docs:
        if d["kind"] == "HorizontalPodAutoscaler":
            ref = d["spec"]["scaleTargetRef"]
            if find(docs, ref["kind"], ref["name"]) is None:
                problems.append(f"{name_of(d)}: scales a missing {ref['kind']}/{ref['name']}")
        elif d["kind"] == "PodDisruptionBudget" and not pods_selected(docs, d["spec"]["selector"]["matchLabels"]):
            problems.append(f"{name_of(d)}: selects no pods")
        elif d["kind"] == "Service":
            problems += _service_problems(docs, d)
    return problems


def _service_problems(docs: list[dict], service: dict) -> list[str]:
    targets = pods_selected(docs, service["spec"].get("selector", {}))
    if not targets:
        return [f"{name_of(service)}: selects no pods"]
    problems = []
    for target in targets:
        ports = [p for c in target["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])]
        for port in service["spec"]["ports"]:
            wanted = port.get("targetPort", port["port"])
            if not any(wanted in (p.get("name"), p["containerPort"]) for p in ports):
                problems.append(
                    f"{name_of(service)}: port {port['name']} targets {wanted!r}, not a port of {name_of(target)}"
                )
    return problems


def hardening_problems(docs: list[dict]) -> list[str]:
    """Every container: requests and limits, no privilege escalation, no capabilities, non-root;
    read-only root filesystem except Triton's (NVIDIA's image is not known to run read-only)."""
    problems = []
    for d in deployments(docs):
        pod = d["spec"]["template"]["spec"]
        pod_security = pod.get("securityContext", {})
        if pod_security.get("seccompProfile", {}).get("type") != "RuntimeDefault":
            problems.append(f"{name_of(d)}: no RuntimeDefault seccomp profile")
        if pod.get("automountServiceAccountToken") is not False:
            problems.append(f"{name_of(d)}: mounts a service account token it does not need")
        for c in containers(pod):
            where = f"{name_of(d)}/{c['name']}"
            security = c.get("securityContext", {})
            for part in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(c.get("resources", {}).get(part, {})):
                    problems.append(f"{where}: no cpu and memory {part}")
            if not security.get("runAsNonRoot", pod_security.get("runAsNonRoot")):
                problems.append(f"{where}: may run as root")
            if security.get("runAsUser", pod_security.get("runAsUser", 0)) == 0:
                problems.append(f"{where}: runs as uid 0")
            if security.get("allowPrivilegeEscalation") is not False:
                problems.append(f"{where}: allows privilege escalation")
            if security.get("capabilities", {}).get("drop") != ["ALL"]:
                problems.append(f"{where}: keeps capabilities")
            if not security.get("readOnlyRootFilesystem") and not c["image"].startswith("meshserve-triton"):
                problems.append(f"{where}: writable root filesystem")
            image = c["image"]
            if ":" not in image.rsplit("/", 1)[-1] or image.endswith(":latest"):
                problems.append(f"{where}: image {image} has no pinned tag")
    return problems


def catalog_problems(docs: list[dict]) -> list[str]:
    """Every meshserve container points MESHSERVE_CATALOG at the catalog ConfigMap's mounted file."""
    problems = []
    for d in deployments(docs):
        pod = d["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in containers(pod):
            if not c["image"].startswith("meshserve:"):
                continue
            env = {e["name"]: e.get("value") for e in c.get("env", [])}
            path = env.get("MESHSERVE_CATALOG")
            mounted = {
                f"{m['mountPath']}/{key}"
                for m in c.get("volumeMounts", [])
                if "configMap" in volumes.get(m["name"], {})
                and volumes[m["name"]]["configMap"]["name"].startswith("meshserve-catalog")
                for key in _configmap_keys(docs, volumes[m["name"]]["configMap"]["name"])
            }
            if path not in mounted:
                problems.append(
                    f"{name_of(d)}/{c['name']}: MESHSERVE_CATALOG={path} is not the mounted catalog {mounted}"
                )
    return problems


def _configmap_keys(docs: list[dict], name: str) -> list[str]:
    cm = find(docs, "ConfigMap", name)
    return list(cm.get("data", {})) if cm else []


def mesh_container(docs: list[dict], stage: str) -> dict:
    deployment = find(docs, "Deployment", stage)
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == stage)


def probe_problems(docs: list[dict], ports: dict[str, int]) -> list[str]:
    """gRPC stages: startup, readiness and liveness probes are k8s `grpc:` probes on the stage's gRPC
    port (its health service); the gateway: HTTP /readyz (readiness) and /healthz (liveness)."""
    problems = []
    for stage in MESH:
        c = mesh_container(docs, stage)
        probes = {kind: c.get(f"{kind}Probe") or {} for kind in ("startup", "readiness", "liveness")}
        if stage == "gateway":
            wanted = {"readiness": "/readyz", "liveness": "/healthz", "startup": "/healthz"}
            for kind, path in wanted.items():
                got = probes[kind].get("httpGet", {})
                if got.get("path") != path or _port(c, got.get("port")) != ports["gateway"]:
                    problems.append(f"gateway: {kind} probe is {got}, not GET {path} on {ports['gateway']}")
            continue
        for kind, probe in probes.items():
            if "grpc" not in probe or probe["grpc"].get("port") != ports[stage]:
                problems.append(f"{stage}: {kind} probe is {probe}, not grpc on port {ports[stage]}")
    return problems


def _port(container: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    return next((p["containerPort"] for p in container.get("ports", []) if p.get("name") == port), None)


def topology_problems(docs: list[dict], topology) -> list[str]:
    """The Services, ports and addresses that deploy/envoy/topology.k8s.yaml (a generate.Topology) expects."""
    problems = []
    for doc in docs:
        if doc["kind"] != "Namespace" and doc["metadata"].get("namespace") != "meshserve":
            problems.append(
                f"{name_of(doc)}: namespace {doc['metadata'].get('namespace')}, the topology says meshserve"
            )
    for name, svc in topology.services.items():
        for replica in svc.replicas:
            host, _, port = replica.rpartition(":")
            service_name, _, rest = host.partition(".")
            service = find(docs, "Service", service_name)
            if service is None or rest != "meshserve.svc.cluster.local":
                problems.append(f"{name}: replica {replica} is no Service of the meshserve namespace")
                continue
            if service["spec"].get("clusterIP") != "None":
                problems.append(f"{name_of(service)}: not headless, Envoy would see one address for every pod")
            if int(port) not in [p["port"] for p in service["spec"]["ports"]]:
                problems.append(f"{name_of(service)}: no port {port}")
    envoy_ports = [p["port"] for p in find(docs, "Service", "envoy")["spec"]["ports"]]
    listeners = {"front": topology.front.port} | {n: s.listen.port for n, s in topology.services.items() if s.listen}
    for name, port in listeners.items():
        if port not in envoy_ports:
            problems.append(f"Service/envoy: no port {port} for Envoy's {name} listener")
    env = {e["name"]: e.get("value") for e in mesh_container(docs, "gateway").get("env", [])}
    for name, port in listeners.items():
        if name == "front":
            continue
        wanted = f"envoy.meshserve.svc.cluster.local:{port}"
        got = env.get(f"MESHSERVE_GATEWAY_{name.upper()}_ADDRESS")
        if got != wanted:
            problems.append(f"gateway: reaches {name} at {got}, not through Envoy at {wanted}")
    return problems
