"""Where the fleet runs: docker-compose.yml, .env.example, the images and the Kubernetes manifests.

The compose file is validated by Compose itself (``docker-compose config``, or the ``docker
compose`` plugin); that test skips, saying why, only where neither is installed (``make test``
installs one). Every other check reads the files as YAML and needs nothing installed.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from routing.catalog import CATALOG, checkpoint_spec
from routing.classes import VramClass, consumed_queues
from routing.io.connection import tls_options
from routing.memory import Mode, placement
from routing.planning.plan import load_job_costs
from routing.planning.sim import DEFAULT_MIX, own_queues, service_means
from routing.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
ENV_EXAMPLE = ROOT / ".env.example"
K8S = ROOT / "deploy" / "k8s"

GPU_WORKERS = {"worker-gpu16": 1, "worker-gpu80": 1, "worker-h100x8": 8}
ALWAYS_ON = {"redis", "minio", "minio-init", "flower", "api", "webhooks"}
CPU_PROFILE = {"worker-cpu16", "worker-cpu80", "small-models"}
ONE_SHOT = {"minio-init", "small-models"}
GPU_COUNT = {VramClass.GPU16: 1, VramClass.GPU80: 1, VramClass.H100X8: 8}
MIN_REPLICAS = {VramClass.GPU16: 1, VramClass.GPU80: 0, VramClass.H100X8: 0}


def _compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def _env_example() -> dict[str, str]:
    """Assignments of .env.example, commented-out ones included (``# FLEET_X=...``)."""
    found = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = re.fullmatch(r"#?\s*([A-Z][A-Z0-9_]*)=(.*)", line.strip())
        if match:
            found[match.group(1)] = match.group(2)
    return found


def _k8s(kind: str) -> dict[str, dict[str, Any]]:
    docs = [d for path in sorted(K8S.glob("*.yaml")) for d in yaml.safe_load_all(path.read_text()) if d]
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def _compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


# --- docker-compose.yml ------------------------------------------------------------------------


def test_compose_config_validates(tmp_path: Path) -> None:
    command = _compose_command()
    if command is None:
        pytest.skip("no Compose to validate with: install docker-compose (apt) or the docker compose plugin")
    # A copy beside a .env made from the example: the services' env_file must exist, and a
    # developer's own .env must not decide whether the committed files validate.
    shutil.copy(COMPOSE, tmp_path / "docker-compose.yml")
    shutil.copy(ENV_EXAMPLE, tmp_path / ".env")
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    result = subprocess.run(
        [*command, "--profile", "cpu", "--profile", "gpu", "config"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    services = yaml.safe_load(result.stdout)["services"]
    assert set(services) == ALWAYS_ON | CPU_PROFILE | set(GPU_WORKERS)
    # Interpolated from .env: Flower's credentials.
    assert (
        services["flower"]["environment"]["FLOWER_BASIC_AUTH"].startswith("ops:")
        or ":" in services["flower"]["environment"]["FLOWER_BASIC_AUTH"]
    )
    for name, count in GPU_WORKERS.items():
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["count"] == count


def test_compose_publishes_ports_on_loopback_only() -> None:
    published = {
        name: service["ports"] for name, service in _compose()["services"].items() if service.get("ports")
    }
    assert {"api", "flower"} <= set(published)
    for name, ports in published.items():
        for port in ports:
            assert str(port).startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"


def test_api_metrics_are_scraped_from_their_own_port() -> None:
    port = _env_example()["FLEET_METRICS_PORT"]
    assert _k8s("ConfigMap")["fleet-config"]["data"]["FLEET_METRICS_PORT"] == port
    api = _k8s("Deployment")["api"]["spec"]["template"]
    assert api["metadata"]["annotations"]["prometheus.io/port"] == port
    assert {p["containerPort"] for p in api["spec"]["containers"][0]["ports"]} == {8000, int(port)}


def test_compose_has_every_service_with_a_healthcheck() -> None:
    services = _compose()["services"]
    assert set(services) == ALWAYS_ON | CPU_PROFILE | set(GPU_WORKERS)
    for name, service in services.items():
        if name in ONE_SHOT:
            assert service.get("restart") == "no", name
            assert "healthcheck" not in service, name
        else:
            assert service["healthcheck"]["test"], name


def test_compose_profiles_split_gpu_and_cpu_workers() -> None:
    services = _compose()["services"]
    for name in ALWAYS_ON:
        assert "profiles" not in services[name], name
    for name in GPU_WORKERS:
        assert services[name]["profiles"] == ["gpu"]
    for name in CPU_PROFILE:
        assert services[name]["profiles"] == ["cpu"]
    for name in ("worker-cpu16", "worker-cpu80"):
        env = services[name]["environment"]
        assert env["FLEET_DEVICE"] == "cpu"
        assert env["FLEET_MODEL_ROOT"] == "/models/small"
        # The CPU image, with the worker code; the API's image has none.
        assert services[name]["image"] == services["webhooks"]["image"] == "gpu-fleet-cpu:latest"
    assert services["small-models"]["command"][-2:] == ["--out", "/models/small"]


def test_compose_gpu_workers_reserve_their_gpus_and_name_their_class() -> None:
    services = _compose()["services"]
    for name, count in GPU_WORKERS.items():
        service = services[name]
        (device,) = service["deploy"]["resources"]["reservations"]["devices"]
        assert (device["driver"], device["count"], device["capabilities"]) == ("nvidia", count, ["gpu"])
        assert service["environment"]["FLEET_WORKER_CLASS"] == name.removeprefix("worker-")
        assert service["command"] == ["python", "-m", "worker"]
        assert "FLEET_WORKER_CLASS" in " ".join(service["healthcheck"]["test"])
    assert services["worker-h100x8"]["ipc"] == "host"
    assert services["worker-h100x8"]["shm_size"]


def test_compose_commands_are_the_documented_ones() -> None:
    services = _compose()["services"]
    assert services["api"]["command"] == [
        "uvicorn",
        "producer.api:app",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    assert "/healthz" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["webhooks"]["command"] == ["python", "-m", "worker.webhooks"]
    assert " ".join(services["flower"]["command"]) == (
        "celery -A producer.flower flower --port=5555 --address=0.0.0.0"
    )
    assert services["flower"]["environment"]["FLOWER_BASIC_AUTH"] == "${FLOWER_USER}:${FLOWER_PASSWORD}"
    redis = services["redis"]["command"]
    assert redis[redis.index("--requirepass") + 1] == "${REDIS_PASSWORD}"
    assert redis[redis.index("--appendonly") + 1] == "yes"
    assert "mc mb" in services["minio-init"]["command"][0]


def test_app_services_read_the_one_env_file() -> None:
    services = _compose()["services"]
    for name, service in services.items():
        if name not in {"redis", "minio"}:
            assert service["env_file"] == ".env", name


# --- .env.example ------------------------------------------------------------------------------


def test_env_example_names_every_fleet_setting() -> None:
    names = set(_env_example())
    missing = {f"FLEET_{field.upper()}" for field in Settings.model_fields} - names
    assert not missing, f".env.example lacks {sorted(missing)}"
    for name in (
        "REDIS_PASSWORD",
        "MINIO_ROOT_USER",
        "MINIO_ROOT_PASSWORD",
        "FLOWER_USER",
        "FLOWER_PASSWORD",
    ):
        assert name in names


def test_env_example_values_load_as_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    active = {
        line.split("=", 1)[0]: line.split("=", 1)[1]
        for line in ENV_EXAMPLE.read_text().splitlines()
        if line and not line.startswith("#")
    }
    for name in [n for n in os.environ if n.startswith("FLEET_")]:
        monkeypatch.delenv(name)
    for name, value in active.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    assert settings.storage_backend == "s3"
    assert settings.s3_endpoint_url == "http://minio:9000"
    # The broker URL must carry the password Redis is started with.
    assert settings.redis_url == f"redis://:{active['REDIS_PASSWORD']}@redis:6379/0"


# --- images ------------------------------------------------------------------------------------


def _dockerfile(name: str) -> str:
    return (ROOT / "deploy" / name).read_text()


def _extras() -> dict[str, list[str]]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0] for r in requirements}


def test_images_pin_the_projects_torch_and_run_as_non_root() -> None:
    (torch_pin,) = [d for d in _extras()["worker-base"] if d.replace(" ", "").startswith("torch==")]
    version = torch_pin.split("==", 1)[1]
    for name in ("Dockerfile.worker", "Dockerfile.cpu"):
        assert f"ARG TORCH_VERSION={version}\n" in _dockerfile(name), name
    for name in ("Dockerfile.worker", "Dockerfile.cpu", "Dockerfile.api"):
        assert re.search(r"^USER fleet$", _dockerfile(name), re.M), name
    assert "cudnn-runtime-ubuntu22.04" in _dockerfile("Dockerfile.worker")
    assert "FROM python:3.11-slim" in _dockerfile("Dockerfile.api")
    assert "FROM python:3.11-slim" in _dockerfile("Dockerfile.cpu")


def test_gpu_workers_run_onnx_on_cuda_and_cpu_workers_on_the_cpu() -> None:
    """The GPU image installs ONNX Runtime's CUDA build instead of its CPU one (both are the one
    ``onnxruntime`` module: never both); the CPU image and development machines the CPU one."""
    extras = _extras()
    assert "gpu-fleet[worker-base]" in extras["worker"] and "gpu-fleet[worker-base]" in extras["worker-gpu"]
    assert {"onnxruntime", "onnxruntime-gpu"}.isdisjoint(_names(extras["worker-base"]))
    assert "onnxruntime" in _names(extras["worker"]) and "onnxruntime-gpu" not in _names(extras["worker"])
    assert "onnxruntime-gpu" in _names(extras["worker-gpu"]) and "onnxruntime" not in _names(
        extras["worker-gpu"]
    )
    installs = {
        name: re.findall(r'pip install "\./src\[([^\]]+)\]"', _dockerfile(name))
        for name in ("Dockerfile.worker", "Dockerfile.cpu")
    }
    assert installs == {"Dockerfile.worker": ["worker-gpu"], "Dockerfile.cpu": ["worker"]}
    assert "gpu-fleet[worker,api]" in extras["dev"]  # the suite runs the CPU build
    # The compose file's GPU workers are built from the GPU image, its CPU workers from the CPU one.
    for name, service in _compose()["services"].items():
        dockerfile = (service.get("build") or {}).get("dockerfile", "")
        if "gpu" in (service.get("profiles") or []):
            assert dockerfile.endswith("Dockerfile.worker"), name
        if "cpu" in (service.get("profiles") or []) and "worker" in " ".join(service.get("command") or []):
            assert dockerfile.endswith("Dockerfile.cpu"), name


def test_api_image_has_no_worker_code_and_no_torch() -> None:
    text = _dockerfile("Dockerfile.api")
    copied = [
        line.split()[1] for line in text.splitlines() if line.startswith("COPY ") and "--from" not in line
    ]
    assert copied == ["pyproject.toml", "routing", "producer"]
    assert 'pip install "./src[api]"' in text
    assert not re.search(r"^(ARG TORCH|RUN .*torch)", text, re.M)


def test_no_image_copies_the_test_scaffolding() -> None:
    """testkit/ (small-model builders, CPU stand-ins, faulty stores) is in no image: every image
    copies only the packages it installs, the build context leaves testkit/ out, and the one
    compose service that runs the builder mounts it from the checkout."""
    for name in ("Dockerfile.worker", "Dockerfile.cpu", "Dockerfile.api"):
        text = _dockerfile(name)
        copied = [
            line.split()[1]
            for line in text.splitlines()
            if line.startswith(("COPY ", "ADD ")) and "--from" not in line
        ]
        assert copied and set(copied) <= {"pyproject.toml", "routing", "producer", "worker"}, (name, copied)
        instructions = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        assert "testkit" not in instructions and "small_models" not in instructions, name
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert "testkit" in ignored
    services = _compose()["services"]
    builder = services["small-models"]
    assert builder["command"][:3] == ["python", "-m", "testkit.small_models"]
    assert f"./testkit:{builder['working_dir']}/testkit:ro" in builder["volumes"]
    others = {name: s for name, s in services.items() if name != "small-models"}
    for name, service in others.items():
        assert "testkit" not in " ".join(service.get("command") or []), name


def test_services_on_the_api_image_run_no_worker_module() -> None:
    """The API's image carries no worker/: whatever runs a ``worker`` module runs another image."""
    services = _compose()["services"]
    for name, service in services.items():
        command = " ".join(service.get("command") or [])
        health = " ".join(service.get("healthcheck", {}).get("test") or [])
        if re.search(r"\bworker\b", f"{command} {health}"):
            assert service["image"] != services["api"]["image"], name
    assert services["flower"]["image"] == services["api"]["image"] == "gpu-fleet-slim:latest"
    for name, deployment in _k8s("Deployment").items():
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if container["image"] == "gpu-fleet-slim":
                assert not re.search(r"\bworker\b", " ".join(container.get("command") or [])), name


# --- Kubernetes --------------------------------------------------------------------------------


def test_kustomization_lists_every_manifest() -> None:
    listed = set(yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"])
    assert listed == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


@pytest.mark.parametrize("vram_class", list(VramClass))
def test_worker_deployment_requests_its_gpus_on_its_nodes(vram_class: VramClass) -> None:
    deployment = _k8s("Deployment")[f"worker-{vram_class}"]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    resources = container["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == GPU_COUNT[vram_class]
    assert resources["limits"]["nvidia.com/gpu"] == GPU_COUNT[vram_class]
    assert pod["nodeSelector"] == {"fleet/vram-class": vram_class.value}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["FLEET_WORKER_CLASS"] == vram_class.value
    assert "replicas" not in deployment["spec"]  # KEDA owns the count


@pytest.mark.parametrize("vram_class", list(VramClass))
def test_worker_grace_period_covers_the_longest_job_it_runs(vram_class: VramClass) -> None:
    means = service_means(load_job_costs(), [(m, k) for m, k, _ in DEFAULT_MIX])
    longest_s = max(s for (_, _, worker_class), s in means.items() if worker_class is vram_class)
    pod = _k8s("Deployment")[f"worker-{vram_class}"]["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= longest_s


@pytest.mark.parametrize("vram_class", list(VramClass))
def test_scaled_object_follows_its_class_queues(vram_class: VramClass) -> None:
    scaled = _k8s("ScaledObject")[f"worker-{vram_class}"]
    spec = scaled["spec"]
    assert spec["scaleTargetRef"]["name"] == f"worker-{vram_class}"
    assert spec["minReplicaCount"] == MIN_REPLICAS[vram_class]
    lists = [t["metadata"]["listName"] for t in spec["triggers"]]
    assert all(t["type"] == "redis" for t in spec["triggers"])
    assert vram_class.queue in lists
    # Its own queues, every one of them, and never a smaller class's: a gpu16 backlog must not
    # start H100s (bigger workers take it only when already up and idle).
    assert sorted(lists) == sorted(own_queues(vram_class))
    assert set(lists) <= set(consumed_queues(vram_class))
    auth = _k8s("TriggerAuthentication")
    for trigger in spec["triggers"]:
        assert int(trigger["metadata"]["listLength"]) >= 1
        (ref,) = auth[trigger["authenticationRef"]["name"]]["spec"]["secretTargetRef"]
        assert (ref["parameter"], ref["key"]) == ("password", "REDIS_PASSWORD")


def _with_component(*names: str) -> dict[tuple[str, str], dict[str, Any]]:
    """The base manifests with kustomize components ``names``' JSON patches applied in turn, by
    (kind, name): the patch operations they use (add, replace, remove; ``-`` appends to a list)
    done as kustomize does them."""
    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for path in sorted(K8S.glob("*.yaml"))
        for d in yaml.safe_load_all(path.read_text())
        if d and "metadata" in d
    }
    for name in names:
        component = yaml.safe_load((K8S / name / "kustomization.yaml").read_text())
        assert component["kind"] == "Component"
        for patch in component["patches"]:
            target = docs[(patch["target"]["kind"], patch["target"]["name"])]
            for op in yaml.safe_load(patch["patch"]):
                *parents, last = op["path"].strip("/").split("/")
                node = target
                for part in parents:
                    node = node[int(part)] if isinstance(node, list) else node[part]
                if isinstance(node, list):
                    assert op["op"] == "add" and last == "-", op
                    node.append(op["value"])
                elif op["op"] == "remove":
                    del node[last]
                else:
                    assert (last in node) == (op["op"] == "replace"), op
                    node[last] = op["value"]
    return docs


def test_the_sentinel_component_points_the_fleet_and_keda_at_the_sentinels() -> None:
    docs = _with_component("sentinel")
    data = docs[("ConfigMap", "fleet-config")]["data"]
    settings = Settings(
        **{
            key.removeprefix("FLEET_").lower(): value
            for key, value in data.items()
            if key.startswith("FLEET_REDIS")
        }
    )
    assert len(settings.redis_sentinels) >= 3 and settings.redis_min_replicas >= 1
    for vram_class in VramClass:
        triggers = docs[("ScaledObject", f"worker-{vram_class}")]["spec"]["triggers"]
        base = _k8s("ScaledObject")[f"worker-{vram_class}"]["spec"]["triggers"]
        # The same lists and lengths as the base, read through the Sentinels.
        assert [(t["metadata"]["listName"], t["metadata"]["listLength"]) for t in triggers] == [
            (t["metadata"]["listName"], t["metadata"]["listLength"]) for t in base
        ]
        for trigger in triggers:
            assert trigger["type"] == "redis-sentinel"
            assert "addressFromEnv" not in trigger["metadata"]
            assert data[trigger["metadata"]["addressesFromEnv"]] == data["FLEET_REDIS_SENTINELS"]
            assert data[trigger["metadata"]["sentinelMasterFromEnv"]] == settings.redis_sentinel_master


@pytest.mark.parametrize("with_sentinel", [False, True], ids=["alone", "with-sentinel"])
def test_the_redis_tls_component_gives_every_redis_client_and_keda_the_ca(with_sentinel: bool) -> None:
    """What the component's comment says to make (the Secret, the rediss:// URL) is what its
    patches read: every container that talks to Redis sees the CA at the URL's ssl_ca_certs, and
    KEDA's triggers get tls and ca from the same Secret."""
    text = (K8S / "redis-tls" / "kustomization.yaml").read_text()
    [url] = re.findall(r"rediss://:\S+", text)  # the example URL, with its password
    secret = re.search(
        r"create secret generic (\S+) .*?--from-file=([\w.]+)=.*?--from-literal=tls=enable", text, re.S
    )
    assert secret is not None
    secret_name, ca_key = secret.groups()
    options = tls_options(
        Settings(
            redis_url=url.replace("<password>", "pw").replace("<host>", "redis").replace("<port>", "6380")
        )
    )
    assert options is not None and options["ssl_cert_reqs"] == "required"
    docs = _with_component(*(["sentinel"] if with_sentinel else []), "redis-tls")
    talks_to_redis = ["api", "webhooks", "flower", *(f"worker-{c}" for c in VramClass)]
    for name in talks_to_redis:
        pod = docs[("Deployment", name)]["spec"]["template"]["spec"]
        [volume] = [v for v in pod["volumes"] if v.get("secret", {}).get("secretName") == secret_name]
        [item] = volume["secret"]["items"]
        assert item["key"] == ca_key
        container = pod["containers"][0]
        assert {"secretRef": {"name": "fleet-secrets"}} in container["envFrom"]  # where the URL is
        [mount] = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        assert f"{mount['mountPath']}/{item['path']}" == options["ssl_ca_certs"] and mount["readOnly"]
    # Each pod's other volumes are still there (appended to, not replaced).
    base = _k8s("Deployment")
    for name in talks_to_redis:
        before = base[name]["spec"]["template"]["spec"].get("volumes", [])
        assert docs[("Deployment", name)]["spec"]["template"]["spec"]["volumes"][: len(before)] == before
    refs = {
        r["parameter"]: r for r in docs[("TriggerAuthentication", "fleet-redis")]["spec"]["secretTargetRef"]
    }
    assert (refs["password"]["name"], refs["password"]["key"]) == ("fleet-secrets", "REDIS_PASSWORD")
    assert (refs["tls"]["name"], refs["tls"]["key"]) == (secret_name, "tls")
    assert (refs["ca"]["name"], refs["ca"]["key"]) == (secret_name, ca_key)
    for vram_class in VramClass:
        for trigger in docs[("ScaledObject", f"worker-{vram_class}")]["spec"]["triggers"]:
            assert trigger["authenticationRef"]["name"] == "fleet-redis"
            assert trigger["type"] == ("redis-sentinel" if with_sentinel else "redis")
            # TLS from the TriggerAuthentication: KEDA refuses it beside enableTLS/unsafeSsl.
            assert not {"enableTLS", "unsafeSsl"} & set(trigger["metadata"])


def test_api_webhooks_and_flower_run_on_kubernetes() -> None:
    deployments = _k8s("Deployment")
    services = _k8s("Service")
    api = deployments["api"]["spec"]["template"]["spec"]["containers"][0]
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert services["api"]["spec"]["ports"][0]["targetPort"] == "http"
    assert deployments["webhooks"]["spec"]["template"]["spec"]["containers"][0]["command"] == [
        "python",
        "-m",
        "worker.webhooks",
    ]
    assert "flower" in deployments["flower"]["spec"]["template"]["spec"]["containers"][0]["command"][-1]
    assert "flower" in services


@pytest.mark.parametrize("vram_class", list(VramClass))
def test_worker_weights_live_on_the_node_and_an_init_step_fills_them(vram_class: VramClass) -> None:
    """The weights cache outlives the pod (a hostPath on the node, not an emptyDir), and before
    the worker starts an init container fills it from the object store with the class's models,
    on the same volume and settings: a scale-up from zero reads the store once per node."""
    cache_dir = _k8s("ConfigMap")["fleet-config"]["data"]["FLEET_WEIGHTS_CACHE_DIR"]
    pod = _k8s("Deployment")[f"worker-{vram_class}"]["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert set(volumes["fleet-weights"]) == {"name", "hostPath"}
    assert volumes["fleet-weights"]["hostPath"]["path"].startswith("/mnt/")
    (worker,) = pod["containers"]
    owner, filler = pod["initContainers"]

    def mount(container: dict[str, Any]) -> str:
        (path,) = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == "fleet-weights"]
        return path

    assert mount(worker) == mount(filler) == mount(owner) == cache_dir
    assert owner["command"] == [
        "chown",
        f"{pod['securityContext']['runAsUser']}:{pod['securityContext']['fsGroup']}",
        cache_dir,
    ]
    assert owner["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["CHOWN"]}
    assert filler["image"] == worker["image"] and filler["envFrom"] == worker["envFrom"]
    assert "securityContext" not in filler  # the pod's: the fleet user, not root
    command = filler["command"]
    assert command[:4] == ["python", "-m", "worker.weights", "fill"]
    # The class's models, and the official checkpoints of the models its group shards (A14B's
    # are not the diffusers weights their home class reads).
    expected = []
    for spec in CATALOG.values():
        where = placement(spec, vram_class)
        if spec.served and where is not None and where.mode is Mode.SHARDED and spec.official is not None:
            expected.append(checkpoint_spec(spec).key)
        if spec.served and spec.vram_class is vram_class:
            expected.append(spec.key)
    assert command[4:] == expected


def test_compose_gpu_workers_keep_their_weights_in_a_named_volume() -> None:
    compose = _compose()
    for name in GPU_WORKERS:
        service = compose["services"][name]
        cache_dir = service["environment"]["FLEET_WEIGHTS_CACHE_DIR"]
        assert f"weights-cache:{cache_dir}" in service["volumes"], name
    assert "weights-cache" in compose["volumes"]
    # The image makes the mount point the fleet user's, so the named volume starts as its.
    assert "/weights" in _dockerfile("Dockerfile.worker").split("chown -R fleet:fleet", 1)[1].splitlines()[0]
