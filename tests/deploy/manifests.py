"""Rendering and checking the Kubernetes manifests offline.

`render` runs the real `kubectl kustomize`. `schema_problems` validates every object with
kubernetes-validate's strict schemas and also reports objects it has no schema for (an unknown
kind or a removed apiVersion such as autoscaling/v2beta1): its CLI only warns on those and exits 0,
even with --strict. The other checks are what schemas cannot see: references between objects, the
pod hardening we promise, and agreement with the topology Envoy is generated from. Each returns a
list of problems (empty = fine), so that a test can show a broken manifest is caught.
"""

from __future__ import annotations

import re
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
    """Selectors (NetworkPolicies' too), HPA targets, Service target ports, volumes and ConfigMaps resolve."""
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
        elif d["kind"] == "NetworkPolicy":
            selectors = [d["spec"]["podSelector"].get("matchLabels", {})] + [
                peer["podSelector"].get("matchLabels", {})
                for rule in d["spec"].get("ingress", [])
                for peer in rule.get("from", [])
                if "podSelector" in peer and "namespaceSelector" not in peer  # others: pods of other namespaces
            ]
            problems += [f"{name_of(d)}: {s} selects no pods" for s in selectors if not pods_selected(docs, s)]
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


# --- the gateway's control plane: secrets, database, Redis --------------------------------------

# The Secrets the gateway reads, which the operator creates (the manifests ship none): name -> key.
EXTERNAL_SECRETS = {"meshserve-admin": "token", "meshserve-database": "url", "meshserve-service-token": "token"}
# Settings that carry credentials: only ever from a Secret, never a literal `value`.
SECRET_ENV = {
    "MESHSERVE_ADMIN_TOKEN": ("meshserve-admin", "token"),
    "MESHSERVE_GATEWAY_ADMIN_TOKEN": None,  # the setting's other name: must not be set at all
    "MESHSERVE_GATEWAY_DATABASE_URL": ("meshserve-database", "url"),
    "MESHSERVE_SERVICE_TOKEN": ("meshserve-service-token", "token"),
}
# A real-looking API token (the placeholder `msk_admin_$(openssl rand -hex 32)` is not one), and a
# URL with a password that is neither a ${VARIABLE} nor an upper-case placeholder such as PASSWORD.
TOKEN_RE = re.compile(r"msk_[A-Za-z0-9]+_[A-Za-z0-9_-]{16,}")
CREDENTIAL_URL_RE = re.compile(r"\b[a-z][a-z0-9+]*://[^/\s:@'\"]+:(?!\$\{)(?![A-Z_]+@)([^@\s'\"]+)@")
REDIS_URL_RE = re.compile(r"^redis://([a-z0-9-]+):(\d+)/(\d+)$")


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _strings(node) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key)
            yield from _strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from _strings(item)
    elif isinstance(node, str):
        yield node


def secret_problems(docs: list[dict]) -> list[str]:
    """No Secret in the render; credentials only through secretKeyRef to the Secrets the operator
    creates (not optional: a pod without them must not start); no token or password anywhere."""
    problems = [f"{name_of(d)}: a Secret is shipped; the operator creates them" for d in docs if d["kind"] == "Secret"]
    for d in deployments(docs):
        for c in containers(d["spec"]["template"]["spec"]):
            where = f"{name_of(d)}/{c['name']}"
            for e in c.get("env", []):
                ref = e.get("valueFrom", {}).get("secretKeyRef")
                if ref is not None:
                    if EXTERNAL_SECRETS.get(ref.get("name")) != ref.get("key"):
                        problems.append(f"{where}: {e['name']} reads {ref}, not one of the Secrets {EXTERNAL_SECRETS}")
                    if ref.get("optional"):
                        problems.append(f"{where}: {e['name']} is optional: pods would start without it")
                if e["name"] in SECRET_ENV and "value" in e:
                    problems.append(f"{where}: {e['name']} is a literal value, not a secretKeyRef")
            for source in c.get("envFrom", []):
                if "configMapRef" in source:
                    problems.append(f"{where}: envFrom a ConfigMap could carry credentials in the clear")
    for d in docs:
        for text in _strings(d):
            if TOKEN_RE.search(text):
                problems.append(f"{name_of(d)}: holds an API token")
            if CREDENTIAL_URL_RE.search(text):
                problems.append(f"{name_of(d)}: holds a URL with a password")
            if d["kind"] != "Deployment" and any(name in text for name in SECRET_ENV):
                problems.append(f"{name_of(d)}: names {text[:60]!r} outside a Deployment's env")
    return problems


def committed_secret_problems(paths: list[Path]) -> list[str]:
    """The files themselves (comments included): no token, no password in a URL, no secretGenerator."""
    problems = []
    for path in paths:
        text = path.read_text()
        if TOKEN_RE.search(text):
            problems.append(f"{path}: holds an API token")
        if CREDENTIAL_URL_RE.search(text):
            problems.append(f"{path}: holds a URL with a password")
        if path.name == "kustomization.yaml" and "secretGenerator" in (yaml.safe_load(text) or {}):
            problems.append(f"{path}: a secretGenerator puts the secret's value in the repository")
    return problems


def control_plane_problems(docs: list[dict]) -> list[str]:
    """Every gateway replica shares one admin token (Secret), one database (Secret) and one Redis (a
    Service of the render that selects one Redis pod, on its port); authentication is on, and
    /metrics stays public while the pods are scraped by annotation."""
    problems = []
    gateways = [
        d
        for d in deployments(docs)
        if any(c.get("args") == ["serve", "gateway"] for c in containers(d["spec"]["template"]["spec"]))
    ]
    if not gateways:
        return ["no gateway Deployment"]
    for d in gateways:
        c = next(c for c in d["spec"]["template"]["spec"]["containers"] if c.get("args") == ["serve", "gateway"])
        env = _env(c)
        for name, wanted in SECRET_ENV.items():
            ref = env.get(name, {}).get("valueFrom", {}).get("secretKeyRef", {})
            if wanted is None:
                if name in env:
                    problems.append(f"{name_of(d)}: sets {name}; use MESHSERVE_ADMIN_TOKEN")
            elif (ref.get("name"), ref.get("key")) != wanted:
                problems.append(f"{name_of(d)}: {name} is {env.get(name)}, not secret {wanted[0]} key {wanted[1]}")
        if env.get("MESHSERVE_GATEWAY_AUTH", {}).get("value", "true").lower() != "true":
            problems.append(f"{name_of(d)}: authentication is off")
        annotations = d["spec"]["template"]["metadata"].get("annotations", {})
        public = env.get("MESHSERVE_GATEWAY_METRICS_PUBLIC", {}).get("value", "true").lower() == "true"
        if annotations.get("prometheus.io/scrape") == "true" and not public:
            problems.append(f"{name_of(d)}: scraped by annotation without a token, but /metrics needs one")
        problems += _redis_problems(docs, name_of(d), env.get("MESHSERVE_GATEWAY_REDIS_URL", {}).get("value"))
    return problems


def _redis_problems(docs: list[dict], where: str, url: str | None) -> list[str]:
    match = REDIS_URL_RE.match(url or "")
    if match is None:
        return [f"{where}: MESHSERVE_GATEWAY_REDIS_URL is {url!r}, not redis://<service>:<port>/<db>"]
    host, port = match.group(1), int(match.group(2))
    service = find(docs, "Service", host)
    if service is None or port not in [p["port"] for p in service["spec"]["ports"]]:
        return [f"{where}: {url}: no Service {host} with port {port}"]
    problems = []
    for target in pods_selected(docs, service["spec"].get("selector", {})):
        pod = target["spec"]["template"]["spec"]
        redis = [c for c in pod["containers"] if c["image"].split("/")[-1].startswith("redis:")]
        if not redis:
            problems.append(f"{where}: {url}: {name_of(target)} runs no Redis")
            continue
        if target["spec"].get("replicas") != 1 or target["spec"].get("strategy", {}).get("type") != "Recreate":
            problems.append(f"{name_of(target)}: not one pod at a time: replicas would count in different stores")
        mounts = {m["mountPath"] for m in redis[0].get("volumeMounts", [])}
        if "/data" not in mounts:
            problems.append(f"{name_of(target)}: /data is not a volume (read-only root filesystem)")
    return problems


# --- service-to-service access: NetworkPolicies and the service token ----------------------------

STAGES = ("preprocess", "inference", "postprocess")
SERVICE_TOKEN_REF = {"name": "meshserve-service-token", "key": "token"}


def _component(pod_labels: dict) -> str | None:
    return pod_labels.get("app.kubernetes.io/component")


def _pod_components(docs: list[dict], selector: dict) -> set[str]:
    return {_component(d["spec"]["template"]["metadata"].get("labels", {})) for d in pods_selected(docs, selector)}


def _covers(rule: dict, port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") == port and p.get("protocol", "TCP") == "TCP" for p in ports)


def network_policy_problems(docs: list[dict], allowed: dict[tuple[str, int], set[str]]) -> list[str]:
    """`allowed`: (component, port) -> the components whose pods may connect to it. Every such port
    must be behind an Ingress NetworkPolicy, and every rule that admits traffic to it may name only
    pods of this namespace of those components (no empty `from`, no ipBlock, no other namespace)."""
    problems = []
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    for (component, port), callers in allowed.items():
        mine = [
            p
            for p in policies
            if "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
            and component in _pod_components(docs, p["spec"]["podSelector"].get("matchLabels", {}))
        ]
        if not mine:
            problems.append(f"{component}: no NetworkPolicy: any pod may connect to port {port}")
        for policy in mine:
            for rule in policy["spec"].get("ingress", []):
                if not _covers(rule, port):
                    continue
                peers = rule.get("from") or []
                if not peers:
                    problems.append(f"{name_of(policy)}: admits anyone to {component}:{port}")
                for peer in peers:
                    if "ipBlock" in peer or "namespaceSelector" in peer:
                        problems.append(f"{name_of(policy)}: admits {peer} to {component}:{port}")
                        continue
                    extra = _pod_components(docs, peer.get("podSelector", {}).get("matchLabels", {})) - callers
                    if extra:
                        problems.append(f"{name_of(policy)}: admits {sorted(extra)} to {component}:{port}")
    return problems


def service_token_problems(docs: list[dict]) -> list[str]:
    """The stages and the gateway read MESHSERVE_SERVICE_TOKEN from the Secret (required); a Triton
    inference container also has Triton check it on every protocol but health."""
    from services.common.service_auth import HEADER, TRITON_RESTRICTED

    problems = []
    for stage in ("gateway", *STAGES):
        c = mesh_container(docs, stage)
        ref = _env(c).get("MESHSERVE_SERVICE_TOKEN", {}).get("valueFrom", {}).get("secretKeyRef")
        if ref != SERVICE_TOKEN_REF:
            problems.append(f"{stage}: MESHSERVE_SERVICE_TOKEN is {ref}, not the Secret {SERVICE_TOKEN_REF}")
        if c.get("command") == ["tritonserver"]:
            wanted = f"--grpc-restricted-protocol={','.join(TRITON_RESTRICTED)}:{HEADER}=$(MESHSERVE_SERVICE_TOKEN)"
            if wanted not in c.get("args", []):
                problems.append(f"{stage}: tritonserver does not check the service token ({wanted})")
    return problems
