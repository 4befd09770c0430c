"""deploy/k8s: every manifest against the Kubernetes API schemas, and the references
between them (labels and selectors, ports and probes, grace periods, the HPA metric).

Schema validation uses `kubernetes-validate` (in the `dev` extra), which ships the
OpenAPI schemas of each Kubernetes release, so this runs offline. Strict mode: an
unknown or misspelt field fails, as `kubectl apply --validate=strict` would.
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is not installed (pip install -e '.[dev]')")

K8S_DIR = Path(__file__).resolve().parent.parent / "deploy" / "k8s"
# The oldest Kubernetes release the manifests target (the preStop `sleep` action and
# policy/v1 `unhealthyPodEvictionPolicy` need it); the newest shipped is checked too.
MIN_K8S_VERSION = "1.30"
# Applied by hand into the adapter's namespace, not through kustomization.yaml.
NOT_IN_KUSTOMIZATION = {"prometheus-adapter-rules.yaml"}
QUEUE_METRIC = "shoal_queue_length"
# Set for the container's runtime, not read by `python -m server`.
RUNTIME_ENV = {"HOME", "CUPY_CACHE_DIR"}


def _load(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


MANIFEST_FILES = sorted(p for p in K8S_DIR.glob("*.yaml") if p.name != "kustomization.yaml")
DOCUMENTS = [(path.name, doc) for path in MANIFEST_FILES for doc in _load(path)]


def _one(kind: str, *, source: str | None = None) -> dict[str, Any]:
    found = [d for name, d in DOCUMENTS if d["kind"] == kind and source in (None, name)]
    assert len(found) == 1, f"expected one {kind} in deploy/k8s, found {len(found)}"
    return found[0]


def _kustomized(kind: str) -> dict[str, Any]:
    """The one object of `kind` among the files kustomization.yaml applies."""
    listed = set(_load(K8S_DIR / "kustomization.yaml")[0]["resources"])
    found = [d for name, d in DOCUMENTS if d["kind"] == kind and name in listed]
    assert len(found) == 1, f"expected one {kind} in kustomization.yaml, found {len(found)}"
    return found[0]


def _pod_spec() -> dict[str, Any]:
    return _kustomized("Deployment")["spec"]["template"]["spec"]


def _container() -> dict[str, Any]:
    containers = _pod_spec()["containers"]
    assert len(containers) == 1, "the shoal pod runs one container"
    return containers[0]


def _container_port(name: str) -> int:
    ports = {p["name"]: p["containerPort"] for p in _container().get("ports", [])}
    assert name in ports, f"container has no port named {name!r} (has {sorted(ports)})"
    return ports[name]


def _effective_env() -> dict[str, str]:
    """The container's environment: envFrom ConfigMaps, then `env` (which wins)."""
    container = _container()
    configmaps = {
        d["metadata"]["name"]: d.get("data", {})
        for name, d in DOCUMENTS
        if d["kind"] == "ConfigMap" and name not in NOT_IN_KUSTOMIZATION
    }
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        ref = source["configMapRef"]["name"]
        assert ref in configmaps, f"envFrom names ConfigMap {ref!r}, which is not in deploy/k8s"
        env.update(configmaps[ref])
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
    return env


def _prestop_sleep_s() -> int:
    pre_stop = _container()["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        return int(pre_stop["sleep"]["seconds"])
    command = pre_stop["exec"]["command"]
    assert command[0] == "sleep", f"preStop should be a sleep, not {command}"
    return int(command[1])


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9}


def _bytes(quantity: str | int) -> int:
    match = re.fullmatch(r"(\d+)([A-Za-z]*)", str(quantity))
    assert match and match[2] in ("", *_UNITS), f"unsupported quantity {quantity!r}"
    return int(match[1]) * _UNITS.get(match[2], 1)


# -- schemas ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kubernetes_validate():
    return pytest.importorskip(
        "kubernetes_validate",
        reason="kubernetes-validate is not installed (it is in the dev extra: "
        "pip install -e '.[dev]'); Kubernetes schema checks skipped",
    )


def _versions() -> list[str]:
    try:
        import kubernetes_validate
    except ImportError:
        return [MIN_K8S_VERSION]
    return sorted({MIN_K8S_VERSION, kubernetes_validate.latest_version().rsplit(".", 1)[0]})


def test_manifests_exist():
    names = {p.name for p in MANIFEST_FILES}
    assert {"deployment.yaml", "service.yaml", "hpa.yaml", "pdb.yaml"} <= names
    assert len(DOCUMENTS) >= 7


@pytest.mark.parametrize("version", _versions())
@pytest.mark.parametrize(
    ("source", "doc"),
    DOCUMENTS,
    ids=[f"{name}:{doc['kind']}/{doc['metadata']['name']}" for name, doc in DOCUMENTS],
)
def test_manifest_matches_kubernetes_schema(kubernetes_validate, source, doc, version):
    assert version in {v.rsplit(".", 1)[0] for v in kubernetes_validate.utils.all_versions()}, (
        f"kubernetes-validate {kubernetes_validate.__version__} ships no schemas for "
        f"Kubernetes {version}"
    )
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        where = ".".join(str(p) for p in e.path)
        pytest.fail(f"{source}: {doc['kind']} invalid for Kubernetes {version} at {where}: {e}")


def test_strict_validation_rejects_unknown_fields(kubernetes_validate):
    """Guards the check above: a misspelt field must fail, not be ignored."""
    doc = copy.deepcopy(_kustomized("Deployment"))
    doc["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grcp"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, MIN_K8S_VERSION, strict=True)


# -- kustomization ---------------------------------------------------------------------


def test_kustomization_lists_every_manifest():
    kustomization = _load(K8S_DIR / "kustomization.yaml")[0]
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    assert all((K8S_DIR / name).is_file() for name in listed), listed
    expected = {p.name for p in MANIFEST_FILES} - NOT_IN_KUSTOMIZATION
    assert set(listed) == expected


def test_kustomize_builds():
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH; `kubectl kustomize` build not checked")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S_DIR)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    built = [d for d in yaml.safe_load_all(out.stdout) if d]
    namespace = _load(K8S_DIR / "kustomization.yaml")[0]["namespace"]
    assert {d["kind"] for d in built} >= {"Deployment", "Service", "PodDisruptionBudget"}
    for doc in built:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, doc["metadata"]


# -- labels and selectors --------------------------------------------------------------


def test_selectors_match_the_pods():
    deployment = _kustomized("Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= pod_labels.items(), "Deployment selector misses its own pods"

    service = _kustomized("Service")
    assert service["spec"]["selector"] == selector, "Service must select the Deployment's pods"

    pdb = _kustomized("PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"] == {"matchLabels": selector}, "PDB must cover those pods"

    for constraint in _pod_spec().get("topologySpreadConstraints", []):
        assert constraint["labelSelector"] == {"matchLabels": selector}


def test_service_is_headless_on_the_container_ports():
    service = _kustomized("Service")
    assert service["spec"]["clusterIP"] == "None", "client-side round_robin needs headless"
    assert not service["spec"].get("publishNotReadyAddresses", False)
    ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert ports["grpc"]["port"] == 50051
    assert ports["http"]["port"] == 8000 and ports["http"]["appProtocol"] == "http"
    for name, port in ports.items():
        target = port.get("targetPort", port["port"])
        resolved = _container_port(target) if isinstance(target, str) else target
        assert resolved == _container_port(name), f"Service port {name} misses the container"
    assert "metrics" in ports


# -- the pod ---------------------------------------------------------------------------


def test_probes_use_grpc_health_on_the_serving_port():
    container = _container()
    grpc_port = _container_port("grpc")
    assert int(_effective_env()["PORT"]) == grpc_port
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        assert probe is not None, f"{kind} missing"
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, kind
        assert probe["grpc"]["port"] == grpc_port, f"{kind} probes another port"
    # Overall health ("" = the server as a whole), not one service's.
    assert container["readinessProbe"]["grpc"].get("service", "") == ""
    # Liveness must not kill a pod that is still loading its model: the startup probe
    # holds it off, and must allow a long load.
    startup = container["startupProbe"]
    assert startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3) >= 300


def test_http_api_port_matches_the_server_setting():
    """HTTP_PORT (the OpenAI-compatible API, /health, the chat page) is the `http` port."""
    env = _effective_env()
    http_port = _container_port("http")
    assert int(env["HTTP_PORT"]) == http_port != 0
    ports = [int(env["PORT"]), http_port, int(env["METRICS_PORT"])]
    assert len(set(ports)) == 3, f"the server refuses equal ports: {ports}"


def test_termination_grace_covers_prestop_and_drain():
    env = _effective_env()
    drain_s = float(env["DRAIN_GRACE_S"])
    grace_s = _pod_spec()["terminationGracePeriodSeconds"]
    pre_stop_s = _prestop_sleep_s()
    assert 0 < pre_stop_s < 30
    assert grace_s > drain_s + pre_stop_s, (
        f"terminationGracePeriodSeconds {grace_s} must exceed preStop {pre_stop_s} s "
        f"+ DRAIN_GRACE_S {drain_s} s, or SIGKILL cuts the drain short"
    )


def test_server_environment():
    env = _effective_env()
    for name in ("MODEL", "BATCH_SIZE", "MAX_QUEUE_LEN", "NUM_WORKERS", "DEVICE", "HOST"):
        assert name in env, f"{name} not set for the container"
    assert env["DEVICE"] == "cuda"
    assert env["HOST"] == "0.0.0.0", "loopback would be unreachable to probes and clients"
    assert int(env["METRICS_PORT"]) == _container_port("metrics")

    # The values must be ones the server accepts.
    from server.config import _OPTIONS, ServerConfig

    known = {name for name, _ in _OPTIONS.values()}
    unknown = set(env) - known - RUNTIME_ENV
    assert not unknown, f"the server reads no such variables: {sorted(unknown)}"
    config = ServerConfig.from_args([], environ=env)
    assert config.device == "cuda" and config.host == "0.0.0.0"

    for name, doc in DOCUMENTS:
        if doc["kind"] == "ConfigMap" and name not in NOT_IN_KUSTOMIZATION:
            assert "AUTH_TOKEN" not in doc.get("data", {}), "secrets go in a Secret"


def test_gpu_and_resources():
    container = _container()
    resources = container["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) == 1
    gpu_request = resources.get("requests", {}).get("nvidia.com/gpu")
    assert gpu_request is None or int(gpu_request) == 1, "GPU request must equal its limit"
    assert int(_effective_env()["NUM_WORKERS"]) == int(resources["limits"]["nvidia.com/gpu"])
    for key in ("cpu", "memory"):
        assert key in resources["requests"] and key in resources["limits"], key
    # tmpfs pages in /dev/shm are charged to the container's memory.
    shm = next(v for v in _pod_spec()["volumes"] if v["name"] == _mount("/dev/shm")["name"])
    assert _bytes(resources["limits"]["memory"]) > 2 * _bytes(shm["emptyDir"]["sizeLimit"])


def _mount(path: str) -> dict[str, Any]:
    mounts = [m for m in _container().get("volumeMounts", []) if m["mountPath"] == path]
    assert len(mounts) == 1, f"expected one volume mounted at {path}"
    return mounts[0]


def test_volumes():
    volumes = {v["name"]: v for v in _pod_spec()["volumes"]}

    shm = volumes[_mount("/dev/shm")["name"]]["emptyDir"]
    assert shm["medium"] == "Memory" and "sizeLimit" in shm

    model_mount = _mount(str(Path(_effective_env()["MODEL"]).parent))
    assert model_mount.get("readOnly") is True
    claim = volumes[model_mount["name"]]["persistentVolumeClaim"]["claimName"]
    assert claim == _kustomized("PersistentVolumeClaim")["metadata"]["name"]


def test_security_context():
    pod = _pod_spec()["securityContext"]
    container = _container()["securityContext"]
    assert pod["runAsNonRoot"] is True and pod.get("runAsUser", 1) != 0
    assert container["allowPrivilegeEscalation"] is False
    assert container["capabilities"]["drop"] == ["ALL"]


def test_metrics_annotations():
    annotations = _kustomized("Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == _container_port("metrics")
    assert annotations.get("prometheus.io/path", "/metrics") == "/metrics"


# -- autoscaling -----------------------------------------------------------------------


def test_hpa_targets_the_deployment_on_queue_length():
    hpa = _kustomized("HorizontalPodAutoscaler")
    deployment = _kustomized("Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": deployment["apiVersion"],
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    pods_metrics = [m["pods"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"]
    assert [m["metric"]["name"] for m in pods_metrics] == [QUEUE_METRIC]
    assert pods_metrics[0]["target"]["type"] == "AverageValue"

    # The PDB must leave room to evict at least one pod at minReplicas.
    pdb = _kustomized("PodDisruptionBudget")["spec"]
    if "minAvailable" in pdb:
        assert int(pdb["minAvailable"]) < hpa["spec"]["minReplicas"]
    else:
        assert int(pdb["maxUnavailable"]) >= 1


def test_prometheus_adapter_rule_exposes_the_hpa_metric():
    configmap = _one("ConfigMap", source="prometheus-adapter-rules.yaml")
    rules = yaml.safe_load(configmap["data"]["config.yaml"])["rules"]
    exposed = [r for r in rules if r["name"].get("as") == QUEUE_METRIC]
    assert len(exposed) == 1, f"no adapter rule exposes {QUEUE_METRIC}"
    rule = exposed[0]
    assert rule["seriesQuery"].startswith(QUEUE_METRIC)
    assert re.fullmatch(rule["name"]["matches"], QUEUE_METRIC)
    overrides = rule["resources"]["overrides"]
    assert overrides["pod"] == {"resource": "pod"}
    assert overrides["namespace"] == {"resource": "namespace"}
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]


# -- the TLS overlay (deploy/k8s-tls) ---------------------------------------------------------

TLS_DIR = K8S_DIR.parent / "k8s-tls"
# Read by `shoal health` (client/cli.py), not by the server.
PROBE_ENV = {"SHOAL_TLS_CA", "SHOAL_TLS_SERVER_NAME", "SHOAL_TLS_CERT", "SHOAL_TLS_KEY"}


@pytest.fixture(scope="module")
def tls_deployment() -> dict[str, Any]:
    """deploy/k8s-tls built with `kubectl kustomize`: the base plus its TLS patch."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not on PATH; the TLS overlay is not built")
    out = subprocess.run(
        [kubectl, "kustomize", str(TLS_DIR)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    deployments = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment"]
    assert len(deployments) == 1
    return deployments[0]


@pytest.mark.parametrize("version", _versions())
def test_tls_overlay_matches_kubernetes_schema(kubernetes_validate, tls_deployment, version):
    kubernetes_validate.validate(tls_deployment, version, strict=True)


def test_tls_overlay_probes_run_shoal_health_over_tls(tls_deployment):
    """The kubelet's gRPC probes speak plaintext only: with TLS each probe is an exec of
    `shoal health` on the gRPC port, its deadline inside the probe's timeout."""
    spec = tls_deployment["spec"]["template"]["spec"]
    container = spec["containers"][0]
    grpc_port = next(p["containerPort"] for p in container["ports"] if p["name"] == "grpc")
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container[kind]
        assert set(probe) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"exec"}, kind
        command = probe["exec"]["command"]
        assert command[:2] == ["shoal", "health"], command
        assert command[command.index("--target") + 1] == f"127.0.0.1:{grpc_port}"
        assert float(command[command.index("--timeout") + 1]) < probe["timeoutSeconds"]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300

    # The server's certificate, key and the probe's CA: files of the mounted Secret.
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    for name in ("TLS_CERT", "TLS_KEY", "SHOAL_TLS_CA"):
        directory = str(Path(env[name]).parent)
        assert directory in mounts, f"{name}={env[name]} is on no volume"
        assert "secret" in volumes[mounts[directory]], f"{name} should come from a Secret"

    from server.config import _OPTIONS, ServerConfig

    known = {name for name, _ in _OPTIONS.values()}
    unknown = set(env) - known - RUNTIME_ENV - PROBE_ENV
    assert not unknown, f"nothing reads these variables: {sorted(unknown)}"
    server_env = {k: v for k, v in env.items() if k in known and not k.startswith("TLS_")}
    assert ServerConfig.from_args([], environ=server_env).port == grpc_port
