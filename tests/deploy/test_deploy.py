"""deploy/: the compose file and Kubernetes manifests, validated offline and held to the server's settings.

No Docker engine or cluster is needed. The compose file is checked against the Compose Specification's
JSON schema as check-jsonschema vendors it (`check-jsonschema --builtin-schema vendor.compose-spec`);
the manifests against Kubernetes' own schemas as kubernetes-validate ships them, strictly (an unknown
field is an error), for the oldest and the newest Kubernetes we support; the custom resources (KServe's
InferenceService, Kubeflow's PyTorchJob), which it has no schemas for, by their pods and by hand. Then
the numbers that several files must agree on are compared with their one source: serving/config.py for
what the server does with its settings, and the Dockerfile's serving stage for what the image sets and
exposes.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import tomllib
from functools import cache
from pathlib import Path, PurePosixPath

import dockerfile
import pytest
import yaml

from serving.config import ENV_PREFIX, ServerConfig, load_config
from serving.repository.registry import memory_bound

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
PROMETHEUS = DEPLOY / "prometheus.yml"
KUBE = DEPLOY / "kubernetes"
BUNDLE_LOADER = KUBE / "tools" / "bundle-loader.yaml"
# 1.30 is the oldest release we claim, 1.37 the newest the pinned kubernetes-validate knows.
KUBERNETES_VERSIONS = ("1.30.0", "1.37.0")
# The Open Inference Protocol's REST health routes, fixed by the protocol (KServe v2 / Triton).
LIVE_PATH, READY_PATH = "/v2/health/live", "/v2/health/ready"
APP_USER = 10001  # the uid the Dockerfile creates and runs as
COMMON_LABELS = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/component",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/version",
)


# --- the files -----------------------------------------------------------------------------------


def load_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def kube_documents() -> list[tuple[Path, dict]]:
    """Every Kubernetes object under deploy/kubernetes, with its file; the Kustomization left out."""
    paths = sorted(p for p in KUBE.rglob("*.yaml") if p.name != "kustomization.yaml")
    return [(p, doc) for p in paths for doc in yaml.safe_load_all(p.read_text()) if doc]


def kube_object(kind: str, name: str | None = None) -> dict:
    found = [d for _, d in kube_documents() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''} under {KUBE}, found {len(found)}"
    return found[0]


@cache
def deployment() -> dict:
    return kube_object("Deployment")


@cache
def compose_services() -> dict:
    return load_yaml(COMPOSE)["services"]


def serving_container(pod_spec: dict) -> dict:
    return next(c for c in pod_spec["containers"] if c["name"] == "serving")


def project_version() -> str:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


# --- the image, as the Dockerfile builds it ------------------------------------------------------


def image_env(stage: str) -> dict[str, str]:
    return dockerfile.env(stage)


def image_last(stage: str, instruction: str) -> str:
    return dockerfile.last(stage, instruction)


def image_uid(stage: str) -> int:
    return int(image_last(stage, "USER").split(":")[0])


def image_exposed(stage: str) -> set[int]:
    return {int(p.split("/")[0]) for i, args in dockerfile.instructions(stage) if i == "EXPOSE" for p in args.split()}


# --- settings --------------------------------------------------------------------------------------


def cpu_cores(quantity: str) -> int:
    """A Kubernetes CPU quantity rounded up, as the downward API gives it with divisor 1."""
    return math.ceil(int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity))


def container_env(container: dict) -> dict[str, str]:
    env = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            field = var["valueFrom"]["resourceFieldRef"]
            assert field["resource"] == "limits.cpu" and str(field.get("divisor", "1")) == "1", var
            env[var["name"]] = str(cpu_cores(container["resources"]["limits"]["cpu"]))
    return env


def server_config(env: dict[str, str]) -> ServerConfig:
    """What `serving serve` runs with in the serving image given these variables (they override its ENV)."""
    settings = {f"{ENV_PREFIX}{name.upper()}" for name in ServerConfig.model_fields}
    unknown = [n for n in env if n.startswith(ENV_PREFIX) and n not in settings]
    assert not unknown, f"{unknown}: not server settings (serving serve --help lists them)"
    return load_config({}, environ=image_env("serving") | env)


@cache
def kube_config() -> ServerConfig:
    return server_config(container_env(serving_container(deployment()["spec"]["template"]["spec"])))


@cache
def compose_config() -> ServerConfig:
    return server_config(compose_services()["serving"].get("environment", {}))


def seconds(duration: str) -> float:
    """A compose duration such as 20s, 1m30s or 500ms."""
    units = {"h": 3600, "m": 60, "s": 1, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def probed(container: dict, probe: str) -> tuple[str, int, str]:
    """An HTTP probe's (path, port number, scheme), a named port looked up among the container's ports."""
    get = container[probe]["httpGet"]
    ports = {p["name"]: p["containerPort"] for p in container.get("ports", []) if "name" in p}
    return get["path"], ports.get(get["port"], get["port"]), get.get("scheme", "HTTP")


def published(service: dict) -> dict[int, tuple[str, int]]:
    """A compose service's `ports`, short syntax ("[ip:]host:container"), as container port -> (ip, host port)."""
    out = {}
    for entry in service.get("ports", []):
        *ip, host, container = str(entry).split(":")
        out[int(container)] = (ip[0] if ip else "", int(host))
    return out


def under(path: str, folder: str) -> bool:
    return PurePosixPath(folder) in PurePosixPath(path).parents


def tool_or_skip(name: str, why: str) -> str:
    """A command from this environment's bin/ (pytest may run without the venv activated), else PATH."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if not found:
        pytest.skip(f"{name} not found: {why}")
    return found


# --- compose -------------------------------------------------------------------------------------


class TestComposeFile:
    def test_follows_the_compose_specification(self):
        exe = tool_or_skip("check-jsonschema", "pip install -e '.[dev]' brings it")
        command = [exe, "--builtin-schema", "vendor.compose-spec", str(COMPOSE)]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stdout + done.stderr

    def test_references_resolve(self):
        stages = dockerfile.stages()
        for name, service in compose_services().items():
            if "build" in service:
                assert (COMPOSE.parent / service["build"]["context"] / service["build"]["dockerfile"]).is_file()
                target = service["build"]["target"]
                assert target in stages, f"{name}: the Dockerfile has no stage {target}"
            for mount in service.get("volumes", []):
                source = mount["source"] if isinstance(mount, dict) else mount.split(":")[0]
                if "/" not in source and "$" not in source:
                    assert source in load_yaml(COMPOSE)["volumes"], f"{name}: volume {source} is not declared"
                elif "$" not in source:
                    assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
            for dependency, condition in service.get("depends_on", {}).items():
                assert dependency in compose_services()
                # Compose refuses a project where a service needs one that an inactive profile hides.
                if set(compose_services()[dependency].get("profiles", [])) - set(service.get("profiles", [])):
                    assert condition.get("required") is False, f"{name} needs {dependency}, which a profile hides"

    def test_trainer_is_a_one_shot_job_on_read_only_data(self):
        trainer = compose_services()["trainer"]
        assert trainer.get("profiles") and trainer["restart"] == "no"
        data = next(m for m in trainer["volumes"] if isinstance(m, dict) and m["target"] == "/data")
        assert data["type"] == "bind" and data["read_only"] and data["bind"]["create_host_path"] is False
        assert "runs:/runs" in trainer["volumes"]
        assert compose_services()["serving"]["depends_on"]["trainer"]["condition"] == "service_completed_successfully"

    def test_serving_runs_as_the_image_user_on_a_read_only_root(self):
        serving = compose_services()["serving"]
        assert int(str(serving["user"]).split(":")[0]) == image_uid("serving") == APP_USER
        assert serving["read_only"] is True and "/tmp" in serving["tmpfs"]
        assert serving["healthcheck"]["test"] == ["CMD", "serving", "health"]

    def test_serving_publishes_grpc_and_http_and_metrics_on_loopback(self):
        ports = published(compose_services()["serving"])
        cfg = compose_config()
        assert ports.keys() == {cfg.port, cfg.http_port, cfg.metrics_port}
        assert all(host == container for container, (_, host) in ports.items()), ports
        assert ports[cfg.port][0] == ports[cfg.http_port][0] == "", "gRPC and HTTP are for every client"
        assert ports[cfg.metrics_port][0] == "127.0.0.1"

    def test_images_carry_the_project_version(self):
        for name in ("trainer", "serving"):
            assert compose_services()[name]["image"] == f"lesson2/{name}:{project_version()}"


class TestKubernetesManifests:
    @pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
    @pytest.mark.parametrize(
        "path, document",
        [pytest.param(p, d, id=f"{p.relative_to(KUBE)}:{d['kind']}") for p, d in kube_documents()],
    )
    def test_match_the_kubernetes_schemas(self, path, document, version):
        kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' brings it")
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{path.relative_to(ROOT)}: {'.'.join(map(str, e.path))}: {e.message} (Kubernetes {version})")

    def test_kustomization_lists_every_manifest_but_the_tools(self):
        listed = set(load_yaml(KUBE / "kustomization.yaml")["resources"])
        assert listed == {p.name for p in KUBE.glob("*.yaml")} - {"kustomization.yaml"}

    def test_kustomize_builds_them(self):
        kubectl = tool_or_skip("kubectl", "its `kubectl kustomize` renders the kustomization offline")
        done = subprocess.run([kubectl, "kustomize", str(KUBE)], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        built = {(d["kind"], d["metadata"]["name"]) for d in yaml.safe_load_all(done.stdout)}
        files = {(d["kind"], d["metadata"]["name"]) for p, d in kube_documents() if p != BUNDLE_LOADER}
        assert built == files

    def test_labels_and_selectors_agree(self):
        deployment = kube_object("Deployment")
        selector = deployment["spec"]["selector"]["matchLabels"]
        pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert selector.items() <= pod_labels.items()
        for _, d in kube_documents():
            assert all(label in d["metadata"]["labels"] for label in COMMON_LABELS), d["metadata"]["name"]
            assert d["metadata"]["labels"]["app.kubernetes.io/version"] == project_version()
        assert kube_object("Service")["spec"]["selector"] == selector
        assert kube_object("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
        loader = load_yaml(BUNDLE_LOADER)["metadata"]["labels"]
        assert not selector.items() <= loader.items(), "the Service would send calls to the bundle loader"
        hpa = kube_object("HorizontalPodAutoscaler")
        target = {"apiVersion": "apps/v1", "kind": "Deployment", "name": deployment["metadata"]["name"]}
        assert hpa["spec"]["scaleTargetRef"] == target
        assert hpa["spec"]["minReplicas"] == deployment["spec"]["replicas"] >= 2
        assert kube_object("PodDisruptionBudget")["spec"]["minAvailable"] < hpa["spec"]["minReplicas"]
        image = serving_container(deployment["spec"]["template"]["spec"])["image"]
        assert image == f"lesson2/serving:{project_version()}"

    @pytest.mark.parametrize("kind", ["Deployment", "Pod"])
    def test_pods_run_locked_down_as_the_image_user(self, kind):
        obj = kube_object(kind)
        pod = obj["spec"]["template"]["spec"] if kind == "Deployment" else obj["spec"]
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["seccompProfile"] == {"type": "RuntimeDefault"}
        assert (
            security["runAsUser"] == security["runAsGroup"] == security["fsGroup"] == image_uid("serving") == APP_USER
        )
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            assert c["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "readOnlyRootFilesystem": True,
                "capabilities": {"drop": ["ALL"]},
            }
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= c["resources"][bound].keys(), f"{c['name']}: no {bound}"


# --- both, against the server's own settings ------------------------------------------------------


class TestAgreesWithTheServer:
    """Ports, probes, grace periods, bundle path and metrics target, from serving/config.py and the image."""

    @property
    def pod(self) -> dict:
        return deployment()["spec"]["template"]["spec"]

    @property
    def container(self) -> dict:
        return serving_container(self.pod)

    def test_the_server_listens_on_every_interface_on_the_ports_the_image_exposes(self):
        for cfg in (kube_config(), compose_config()):
            assert cfg.host == "0.0.0.0"
            assert {cfg.port, cfg.http_port, cfg.metrics_port} == image_exposed("serving")

    @pytest.mark.parametrize("name", ["port", "http_port", "metrics_port"])
    def test_the_image_keeps_the_servers_default_ports(self, name):
        """So that `serving serve --help`, the image and every manifest name the same numbers."""
        assert int(image_env("serving")[f"{ENV_PREFIX}{name.upper()}"]) == ServerConfig.model_fields[name].default

    def test_container_and_service_ports(self):
        ports = {p["name"]: p["containerPort"] for p in self.container["ports"]}
        cfg = kube_config()
        assert ports == {"grpc": cfg.port, "http": cfg.http_port, "metrics": cfg.metrics_port}
        service_ports = kube_object("Service")["spec"]["ports"]
        for p in service_ports:
            assert ports.get(p["targetPort"], p["targetPort"]) == ports[p["name"]]
        protocols = {p["name"]: p.get("appProtocol") for p in service_ports}
        assert protocols["grpc"] == "grpc" and protocols["http"] == "http"
        annotations = deployment()["spec"]["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == cfg.metrics_port

    @pytest.mark.parametrize(
        "probe, path",
        [("startupProbe", READY_PATH), ("readinessProbe", READY_PATH), ("livenessProbe", LIVE_PATH)],
    )
    def test_probes_ask_the_http_health_routes(self, probe, path):
        """Ready (200 once the model is warm, 503 while it loads or drains) for startup and readiness;
        live for liveness; in the scheme the port speaks."""
        scheme = "HTTPS" if kube_config().tls_cert else "HTTP"
        assert probed(self.container, probe) == (path, kube_config().http_port, scheme)

    def test_kubernetes_waits_out_the_drain_and_the_grace(self):
        shutdown_s = kube_config().drain_s + kube_config().grace_s
        assert kube_config().drain_s > 0, "without a drain, calls reach a pod after it stops accepting them"
        assert self.pod["terminationGracePeriodSeconds"] > shutdown_s
        # Liveness needs longer than a whole shutdown to fail, so it never kills a pod that is draining.
        live = self.container["livenessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > shutdown_s

    def test_compose_waits_out_the_drain_and_the_grace(self):
        shutdown_s = compose_config().drain_s + compose_config().grace_s
        assert seconds(compose_services()["serving"]["stop_grace_period"]) > shutdown_s

    def test_kubernetes_bundle_is_on_the_read_only_models_volume(self):
        mount = next(m for m in self.container["volumeMounts"] if under(str(kube_config().bundle), m["mountPath"]))
        volume = next(v for v in self.pod["volumes"] if v["name"] == mount["name"])
        assert mount["readOnly"] is True
        assert volume["persistentVolumeClaim"] == {"claimName": "classifier-models", "readOnly": True}
        assert kube_object("PersistentVolumeClaim", "classifier-models")
        assert any(m["mountPath"] == "/tmp" for m in self.container["volumeMounts"])

    def test_compose_serves_the_bundle_the_trainer_writes(self):
        serving_mount = next(m for m in compose_services()["serving"]["volumes"] if m["source"] == "runs")
        trainer_mount = next(m for m in compose_services()["trainer"]["volumes"] if str(m).startswith("runs:"))
        command = compose_services()["trainer"].get("command") or json.loads(image_last("trainer", "CMD"))
        out = PurePosixPath(command[command.index("--out") + 1])
        # `trainer run` writes its bundle to <out>/bundle (README, "Using it").
        written = (out / "bundle").relative_to(trainer_mount.split(":")[1])
        assert serving_mount["read_only"] is True
        assert PurePosixPath(compose_config().bundle) == PurePosixPath(serving_mount["target"]) / written

    def test_prometheus_scrapes_the_metrics_port(self):
        jobs = load_yaml(PROMETHEUS)["scrape_configs"]
        targets = [t for job in jobs for static in job["static_configs"] for t in static["targets"]]
        assert targets == [f"serving:{compose_config().metrics_port}"]
        mounts = [str(v).split(":") for v in compose_services()["prometheus"]["volumes"]]
        sources = [COMPOSE.parent / m[0] for m in mounts if m[1] == "/etc/prometheus/prometheus.yml"]
        assert [s.resolve() for s in sources] == [PROMETHEUS]

    def test_prometheus_config_is_valid(self):
        promtool = tool_or_skip("promtool", "apt-get install prometheus brings it")
        done = subprocess.run(
            [promtool, "check", "config", str(PROMETHEUS)], capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stdout + done.stderr


# --- KServe: deploy/kserve/inferenceservice.yaml -------------------------------------------------

INFERENCE_SERVICE = DEPLOY / "kserve" / "inferenceservice.yaml"
# KServe's own predictor fields (its ComponentExtensionSpec) that the file uses; the rest of
# spec.predictor is a Kubernetes PodSpec, inlined.
KSERVE_PREDICTOR_FIELDS = {"minReplicas", "maxReplicas"}
# The container KServe treats as the predictor, and where it mounts that container's STORAGE_URI.
KSERVE_CONTAINER, KSERVE_MODELS = "kserve-container", "/mnt/models"
# What Knative Serving (KServe's Serverless mode) refuses, with its default feature flags: the ports its
# queue-proxy, autoscaler and profiler hold, port names other than these (they choose HTTP/1.1 or
# HTTP/2), environment from the downward API, and these pod fields.
KNATIVE_RESERVED_PORTS = {8008, 8012, 8013, 8022, 9090, 9091}
KNATIVE_PORT_NAMES = {"", "http1", "h2c"}
KNATIVE_REFUSED_POD_FIELDS = {"securityContext", "terminationGracePeriodSeconds", "initContainers"}
# Kubernetes' default terminationGracePeriodSeconds, which KServe's RawDeployment (Standard) mode keeps.
DEFAULT_TERMINATION_GRACE_S = 30


@cache
def inference_service() -> dict:
    return load_yaml(INFERENCE_SERVICE)


def predictor() -> dict:
    return inference_service()["spec"]["predictor"]


def predictor_container() -> dict:
    [container] = predictor()["containers"]
    return container


@cache
def kserve_config() -> ServerConfig:
    return server_config(container_env(predictor_container()))


# What the README's memory formula takes for the model: an EfficientNet-Lite0 bundle at 224 px, rounded up.
MODEL_BYTES = 100 * 2**20


def memory_limit(container: dict) -> int:
    limit = container["resources"]["limits"]["memory"]
    assert limit.endswith("Mi"), limit
    return int(limit[:-2]) * 2**20


@pytest.mark.parametrize("manifest", ["deployment", "inferenceservice"])
def test_the_memory_limit_holds_the_servers_bound(manifest):
    """The server's worst case by its flags (serving.repository.registry.memory_bound, the README's
    formula), both ports answering, fits the container's limit."""
    if manifest == "deployment":
        container, cfg = serving_container(deployment()["spec"]["template"]["spec"]), kube_config()
    else:
        container, cfg = predictor_container(), kserve_config()
    assert cfg.http_port is not None
    assert memory_bound(cfg, [MODEL_BYTES]) <= memory_limit(container)


class TestInferenceService:
    """KServe's InferenceService has no schema in kubernetes-validate: its predictor is validated as the
    Pod it becomes, and the fields KServe requires (serving.kserve.io/v1beta1, a custom predictor's one
    container) by hand. It must run the server as the Deployment does, but for what Knative forbids."""

    @property
    def deployment_pod(self) -> dict:
        return deployment()["spec"]["template"]["spec"]

    def test_is_a_custom_predictor_of_the_deployments_image(self):
        isvc = inference_service()
        assert (isvc["apiVersion"], isvc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
        assert re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", isvc["metadata"]["name"]), "KServe wants a DNS-1035 label"
        assert predictor_container()["name"] == KSERVE_CONTAINER
        assert predictor_container()["image"] == serving_container(self.deployment_pod)["image"]
        labels = isvc["metadata"]["labels"]
        assert all(label in labels for label in COMMON_LABELS)
        assert labels["app.kubernetes.io/version"] == project_version()
        # KServe gives its pods these labels: the Deployment's Service must not send calls to them.
        assert not deployment()["spec"]["selector"]["matchLabels"].items() <= labels.items()

    @pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
    def test_predictor_pod_matches_the_kubernetes_schemas(self, version):
        kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' brings it")
        spec = {k: v for k, v in predictor().items() if k not in KSERVE_PREDICTOR_FIELDS}
        name = f"{inference_service()['metadata']['name']}-predictor"
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(["spec.predictor", *map(str, list(e.path)[1:])])  # the Pod's spec is the predictor
            pytest.fail(f"{INFERENCE_SERVICE.relative_to(ROOT)}: {where}: {e.message} (Kubernetes {version})")

    def test_serves_http_on_the_one_port_kserve_routes_to(self):
        [port] = predictor_container()["ports"]
        assert port["containerPort"] == kserve_config().http_port == kube_config().http_port
        assert kserve_config().host == "0.0.0.0"
        env = container_env(predictor_container())
        assert env["PROTOCOL"] == "v2", "the Open Inference Protocol, as KServe names it"

    @pytest.mark.parametrize(
        "probe, path",
        [("startupProbe", READY_PATH), ("readinessProbe", READY_PATH), ("livenessProbe", LIVE_PATH)],
    )
    def test_probes_are_the_deployments(self, probe, path):
        container, deployed = predictor_container(), serving_container(self.deployment_pod)
        assert probed(container, probe) == (path, kserve_config().http_port, "HTTP")
        timing = {k: v for k, v in container[probe].items() if k != "httpGet"}
        assert timing == {k: v for k, v in deployed[probe].items() if k != "httpGet"}

    def test_runs_the_server_as_the_deployment_does(self):
        assert kserve_config().model_dump(exclude={"bundle"}) == kube_config().model_dump(exclude={"bundle"})
        assert predictor_container()["resources"] == serving_container(self.deployment_pod)["resources"]
        assert kserve_config().drain_s + kserve_config().grace_s < DEFAULT_TERMINATION_GRACE_S

    def test_runs_locked_down_as_the_image_user(self):
        """The Deployment's pod and container security settings, on the container alone; fsGroup has
        no container-level equivalent, and the bundle's files are readable by any user."""
        pod = {k: v for k, v in self.deployment_pod["securityContext"].items() if not k.startswith("fsGroup")}
        expected = pod | serving_container(self.deployment_pod)["securityContext"]
        assert predictor_container()["securityContext"] == expected
        assert expected["runAsUser"] == image_uid("serving") == APP_USER
        assert predictor()["automountServiceAccountToken"] is False
        assert any(m["mountPath"] == "/tmp" for m in predictor_container()["volumeMounts"])

    def test_reads_the_bundle_from_the_deployments_volume(self):
        uri = container_env(predictor_container())["STORAGE_URI"]
        assert uri.startswith("pvc://"), uri
        claim, _, folder = uri.removeprefix("pvc://").partition("/")
        container = serving_container(self.deployment_pod)
        mount = next(m for m in container["volumeMounts"] if under(str(kube_config().bundle), m["mountPath"]))
        volume = next(v for v in self.deployment_pod["volumes"] if v["name"] == mount["name"])
        assert claim == volume["persistentVolumeClaim"]["claimName"] and kube_object("PersistentVolumeClaim", claim)
        assert PurePosixPath(folder) == PurePosixPath(kube_config().bundle).relative_to(mount["mountPath"])
        assert PurePosixPath(kserve_config().bundle) == PurePosixPath(KSERVE_MODELS)

    def test_knative_accepts_it(self):
        container = predictor_container()
        [port] = container["ports"]
        assert port.get("name", "") in KNATIVE_PORT_NAMES and port["containerPort"] not in KNATIVE_RESERVED_PORTS
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert container[probe]["httpGet"]["port"] in (port["containerPort"], port.get("name")), probe
        downward = [
            v["name"] for v in container["env"] if {"fieldRef", "resourceFieldRef"} & v.get("valueFrom", {}).keys()
        ]
        assert not downward, f"{downward}: Knative refuses the downward API in env unless a cluster enables it"
        assert not KNATIVE_REFUSED_POD_FIELDS & predictor().keys()

    def test_prometheus_scrapes_the_metrics_port(self):
        annotations = inference_service()["metadata"]["annotations"]
        assert annotations["serving.kserve.io/enable-prometheus-scraping"] == "true"
        assert int(annotations["prometheus.kserve.io/port"]) == kserve_config().metrics_port
        assert annotations["prometheus.kserve.io/path"] == "/metrics"


# --- distributed training: deploy/training/pytorchjob.yaml ---------------------------------------

TRAINING_JOB = DEPLOY / "training" / "pytorchjob.yaml"
# What Kubeflow's training operator sets in every PyTorchJob pod; nothing else may be referenced.
OPERATOR_ENV = {"MASTER_ADDR": "classifier-train-master-0", "MASTER_PORT": "23456", "WORLD_SIZE": "2", "RANK": "1"}


def training_documents() -> list[dict]:
    return [d for d in yaml.safe_load_all(TRAINING_JOB.read_text()) if d]


def pytorch_job() -> dict:
    [job] = [d for d in training_documents() if d["kind"] == "PyTorchJob"]
    return job


def replica_specs() -> dict[str, dict]:
    return pytorch_job()["spec"]["pytorchReplicaSpecs"]


def trainer_container(role: str) -> dict:
    [container] = [c for c in replica_specs()[role]["template"]["spec"]["containers"] if c["name"] == "pytorch"]
    return container


def expanded_args(role: str) -> list[str]:
    """The container's args as Kubernetes expands them, $(VAR) from the operator's environment."""
    args = trainer_container(role)["args"]
    for arg in args:
        for name in re.findall(r"\$\((\w+)\)", arg):
            assert name in OPERATOR_ENV, f"{role}: $({name}) is not set by the training operator"
    return [re.sub(r"\$\((\w+)\)", lambda m: OPERATOR_ENV[m.group(1)], a) for a in args]


class TestTrainingJob:
    """Kubeflow's PyTorchJob has no schema in kubernetes-validate: its pod templates are validated as
    Kubernetes PodTemplates, its other objects as themselves, and the fields the operator requires
    (kubeflow.org/v1 PyTorchJob: a Master of one replica, a container named `pytorch`) by hand."""

    @pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
    def test_pods_and_volumes_match_the_kubernetes_schemas(self, version):
        kubernetes_validate = pytest.importorskip("kubernetes_validate", reason="pip install -e '.[dev]' brings it")
        documents = [d for d in training_documents() if d["kind"] != "PyTorchJob"]
        documents += [
            {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": role.lower()},
                "template": spec["template"],
            }
            for role, spec in replica_specs().items()
        ]
        for document in documents:
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                pytest.fail(
                    f"{document['kind']} {document['metadata']['name']}: {'.'.join(map(str, e.path))}: {e.message}"
                )

    def test_the_operator_can_run_it(self):
        job = pytorch_job()
        assert job["apiVersion"] == "kubeflow.org/v1"
        specs = replica_specs()
        assert set(specs) == {"Master", "Worker"} and specs["Master"]["replicas"] == 1
        for role, spec in specs.items():
            assert isinstance(spec["replicas"], int) and spec["replicas"] >= 1
            assert spec["restartPolicy"] in {"Always", "OnFailure", "Never", "ExitCode"}, role
            assert trainer_container(role)["image"] == f"lesson2/trainer:{project_version()}"

    @pytest.mark.parametrize("role", ["Master", "Worker"])
    def test_every_node_runs_torchrun_with_the_trainers_own_flags(self, role):
        """The args parse with torchrun's parser and, after `-m trainer`, with the trainer's, so a
        renamed flag on either side fails here rather than in a cluster."""
        from torch.distributed.run import get_args_parser

        from trainer.cli import parser

        container = trainer_container(role)
        assert container["command"] == ["torchrun"]
        args = expanded_args(role)
        torchrun = get_args_parser().parse_args(args)
        assert (torchrun.nnodes, torchrun.node_rank) == (OPERATOR_ENV["WORLD_SIZE"], int(OPERATOR_ENV["RANK"]))
        assert torchrun.module and torchrun.training_script == "trainer"
        run = parser().parse_args(torchrun.training_script_args)
        assert run.func.__name__ == "cmd_run" and run.resume, "a restarted pod must continue the run"
        assert int(torchrun.nproc_per_node) == int(container["resources"]["limits"]["nvidia.com/gpu"])
        assert args == expanded_args("Master"), "every node runs the same command"

    def test_rank_0_writes_the_run_folder_and_every_node_reads_the_data(self):
        run = parser_args_of("Master")
        for role in ("Master", "Worker"):
            mounts = {m["mountPath"]: m for m in trainer_container(role)["volumeMounts"]}
            assert mounts["/data"]["readOnly"] is True and run.data == "/data"
            pod = replica_specs()[role]["template"]["spec"]
            assert pod["securityContext"]["runAsUser"] == image_uid("trainer") == APP_USER
            claims = {v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
            assert claims <= {
                d["metadata"]["name"] for d in training_documents() if d["kind"] == "PersistentVolumeClaim"
            }
        master = {m["mountPath"] for m in trainer_container("Master")["volumeMounts"]}
        worker = {m["mountPath"] for m in trainer_container("Worker")["volumeMounts"]}
        assert PurePosixPath(run.out).parent.as_posix() in master - worker, "only the Master holds the run folder"


def parser_args_of(role: str):
    from torch.distributed.run import get_args_parser

    from trainer.cli import parser

    return parser().parse_args(get_args_parser().parse_args(expanded_args(role)).training_script_args)
