"""The deployment files: Serve configs, the Ray cluster launcher config, the KubeRay manifests.

Each is checked against the schema its consumer applies (Ray Serve's, the Ray autoscaler's),
against mpsserve's own config, and against the generator: a committed Serve config (or a
manifest's serveConfigV2) that differs from what ``scripts/gen_serve_configs.sh`` writes now
fails here, so a change of mpsserve's Serve config format shows up as a diff to commit.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mpsserve.config import ServiceConfig
from mpsserve.config import load_config as load_service
from mpsserve.ops.cli import main
from mpsserve.serving.app import (
    APP_BUILDER,
    check_cpus,
    ingress_replicas,
    model_options,
    service_config_from_serve,
)

ROOT = Path(__file__).resolve().parents[2]
SERVICES = ["local-cpu", "gpu-mps", "gpu-mps-host", "gpu-no-mps", "multi-model", "gpu-mps-k8s"]
MANIFESTS = sorted((ROOT / "deployments" / "k8s").glob("rayservice-*.yaml"))
BLOCK = re.compile(
    r"^(?P<indent> *)# BEGIN serve config: (?P<src>\S+).*?\n(?P<body>.*?)^(?P=indent)# END",
    re.M | re.S,
)


def load_config(path: Path) -> ServiceConfig:
    """A service YAML as the generator reads it: the token and certificate files it names
    (mounted Secrets on the cluster) are not looked for here."""
    return load_service(path, check_files=False)


def serve_file(name: str) -> Path:
    return ROOT / "deployments" / "serve" / f"{name}.yaml"


def generated(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> str:
    """What the generator script writes for deployments/NAME.yaml."""
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    assert main(["serve-config", "--config", f"deployments/{name}.yaml"]) == 0
    return capsys.readouterr().out


def validate_serve(data: dict[str, Any]) -> Any:
    from ray.serve.schema import ServeDeploySchema

    return ServeDeploySchema.model_validate(data)


# -- Serve config files -------------------------------------------------------------------


@pytest.mark.parametrize("name", SERVICES)
def test_serve_config_is_what_the_generator_writes(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert serve_file(name).read_text() == generated(name, monkeypatch, capsys), (
        f"deployments/serve/{name}.yaml is stale: run scripts/gen_serve_configs.sh and commit"
    )


@pytest.mark.parametrize("name", SERVICES)
def test_serve_config_validates_and_holds_its_service(name: str) -> None:
    data = yaml.safe_load(serve_file(name).read_text())
    schema = validate_serve(data)
    (app,) = schema.applications
    assert app.import_path == APP_BUILDER
    assert set(app.args) == {"config"}  # inline: nothing to find on the cluster's disks
    back = service_config_from_serve(data, name, check_files=False)
    assert back == load_config(ROOT / "deployments" / f"{name}.yaml").as_deployed()


@pytest.mark.parametrize("name", SERVICES)
def test_service_yaml_stores_are_absolute(name: str) -> None:
    """A Serve config is read on the cluster: a relative store would resolve where the file
    was generated, not on the nodes."""
    raw = yaml.safe_load((ROOT / "deployments" / f"{name}.yaml").read_text())
    for model in raw["models"]:
        assert model["store"].startswith("/") or "://" in model["store"], model


def test_gpu_configs_place_on_gpus_and_baseline_turns_mps_off() -> None:
    mps, baseline = (load_config(ROOT / "deployments" / f"{n}.yaml") for n in SERVICES[1:4:2])
    assert mps.mps.mode == "on" and baseline.mps.mode == "off"
    assert mps.models[0].placement == baseline.models[0].placement
    multi = load_config(ROOT / "deployments" / "multi-model.yaml")
    assert len(multi.models) == 2 and sum(m.placement.gpu_share for m in multi.models) == 1


SERVICE_YAMLS = sorted(
    [*(ROOT / "deployments").glob("*.yaml"), *(ROOT / "deployments" / "bench").glob("*.yaml")]
)


def test_every_service_yaml_is_listed_here() -> None:
    """A new service YAML gets its Serve config generated and checked like the others."""
    top = {p.stem for p in SERVICE_YAMLS if p.parent.name == "deployments"}
    assert top == {*SERVICES, "local", "local-split"}  # the two `mpsserve serve` runs here


@pytest.mark.parametrize("path", SERVICE_YAMLS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_service_yaml_runs_two_ingress_replicas_or_more(path: Path) -> None:
    """No single point of failure: a killed or redeployed ingress leaves another listening
    ('auto' never gives fewer than two)."""
    replicas = load_config(path).ingress.replicas
    assert replicas == "auto" or replicas >= 2


@pytest.mark.parametrize("name", ["local", "local-cpu"])
def test_local_services_fit_a_two_core_machine(name: str) -> None:
    """What `make serve` (local.yaml) and local-cpu.yaml place on a CPU-only, 2-core Ray."""
    config = load_config(ROOT / "deployments" / f"{name}.yaml")
    options = {m.name: model_options(m, 0, config.mps) for m in config.models}
    check_cpus(config, options, 2, ingress_replicas(config, options, 2))
    assert sum(o["num_replicas"] for o in options.values()) >= (2 if name == "local-cpu" else 1)


# -- Ray cluster launcher -----------------------------------------------------------------


@pytest.fixture(scope="module")
def cluster_yaml() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())


def test_ray_cluster_yaml_validates_against_the_autoscaler_schema(
    cluster_yaml: dict[str, Any],
) -> None:
    """What `ray up` does first: fill in the provider's defaults, then validate."""
    import jsonschema
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cluster_yaml, schema)
    validate_config(prepare_config(copy.deepcopy(cluster_yaml)))


def test_ray_cluster_yaml_wires_the_mps_hook(cluster_yaml: dict[str, Any]) -> None:
    import importlib

    types = cluster_yaml["available_node_types"]
    assert types[cluster_yaml["head_node_type"]]["resources"] == {"CPU": 0}
    assert "--num-cpus=0" in " ".join(cluster_yaml["head_start_ray_commands"])
    start = next(c for c in cluster_yaml["worker_start_ray_commands"] if "ray start" in c)
    hook = re.search(r"RAY_START_HOOK=(\S+)", start)
    assert hook and start.index("RAY_START_HOOK") < start.index("ray start")
    module, _, attr = hook.group(1).rpartition(".")
    assert callable(getattr(importlib.import_module(module), attr))
    service = re.search(r"MPSSERVE_SERVICE_CONFIG=~/mpsserve/(\S+)", start)
    assert service, "the hook reads the deployed service YAML's mps section"
    assert load_config(ROOT / service.group(1)).mps.mode == "on"
    doctor = re.search(r"mpsserve doctor --config ~/mpsserve/(\S+)", start)
    assert doctor and (ROOT / doctor.group(1)).is_file()
    assert cluster_yaml["file_mounts"] == {"~/mpsserve": "."}
    assert any("~/mpsserve" in c for c in cluster_yaml["setup_commands"])
    gpu = next(t for n, t in types.items() if n != cluster_yaml["head_node_type"])
    assert gpu["node_config"]["InstanceType"].startswith(("g4dn.", "g5.", "p5.", "p4d."))


# -- KubeRay manifests --------------------------------------------------------------------


def documents(path: Path) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in yaml.safe_load_all(path.read_text()) if d}


def worker_pod(service: dict[str, Any]) -> dict[str, Any]:
    (group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    return group["template"]


def script(container: dict[str, Any]) -> str:
    assert container["command"][:2] in (["/bin/bash", "-lc"], ["/bin/bash", "-c"])
    (text,) = container["args"]
    checked = subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stderr
    return str(text)


def test_both_strategies_have_a_manifest() -> None:
    assert [p.name for p in MANIFESTS] == [
        "rayservice-mps-host.yaml",
        "rayservice-mps-per-pod.yaml",
    ]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_embedded_serve_config_is_the_generated_one(path: Path) -> None:
    text = path.read_text()
    (block,) = BLOCK.finditer(text)
    source = ROOT / block["src"]
    body = "".join(line.removeprefix(block["indent"]) for line in block["body"].splitlines(True))
    assert body == source.read_text(), f"{path.name}: run scripts/gen_serve_configs.sh"
    serve = documents(path)["RayService"]["spec"]["serveConfigV2"]
    assert isinstance(serve, str)
    data = yaml.safe_load(serve)
    validate_serve(data)
    assert data == yaml.safe_load(source.read_text())


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_rayservice_structure(path: Path) -> None:
    docs = documents(path)
    service = docs["RayService"]
    assert service["apiVersion"] == "ray.io/v1"
    assert service["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == "2.60.0"
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:  # KubeRay's rayStartParams is map[string]string
        assert all(isinstance(v, str) for v in group["rayStartParams"].values()), group
        pod = group["template"]
        assert pod["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
        ray_container = pod["spec"]["containers"][0]
        assert script(ray_container).rstrip().endswith("exec $KUBERAY_GEN_RAY_START_CMD")
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    pod = worker_pod(service)
    container = pod["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {p["name"]: p["containerPort"] for p in container["ports"]} == {
        "serve": 8000,
        "grpc": 9000,
        "metrics": 8002,  # the ingress's GET /metrics (a PodMonitor's target)
    }
    # Serve's proxy is off, so not KubeRay's probe of it (/-/healthz) but the ingress's own.
    probe = container["readinessProbe"]["httpGet"]
    assert probe == {"path": "/v2/health/ready", "port": "serve", "scheme": "HTTPS"}
    assert f'"{probe["path"]}"' in (ROOT / "mpsserve" / "ingress" / "http.py").read_text()
    env = {e["name"]: e["value"] for e in container["env"]}
    mps = load_config(ROOT / "deployments" / "gpu-mps.yaml").mps
    assert env["CUDA_MPS_PIPE_DIRECTORY"] == mps.pipe_dir
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert "/models" in mounts  # deployments/gpu-mps.yaml's store
    (block,) = BLOCK.finditer(path.read_text())
    ingress = load_config(ROOT / "deployments" / Path(block["src"]).name).ingress
    assert ingress.auth is not None and ingress.tls is not None  # the secure setup
    assert ingress.auth.exempt_health  # the probe above carries no token
    for name in (ingress.auth.token_file, ingress.tls.cert_file, ingress.tls.key_file):
        assert str(Path(str(name)).parent) in mounts, name
    assert docs["Service"]["spec"]["selector"].items() <= pod["metadata"]["labels"].items()


def test_per_pod_strategy_starts_its_daemon_before_ray() -> None:
    (path,) = (p for p in MANIFESTS if p.stem.endswith("per-pod"))
    docs = documents(path)
    assert set(docs) == {"RayService", "Service"}  # nothing on the host
    pod = worker_pod(docs["RayService"])["spec"]
    assert not pod.get("hostIPC") and not pod.get("hostPID")
    assert all("hostPath" not in v for v in pod.get("volumes", []))
    text = script(pod["containers"][0])
    assert text.index("nvidia-cuda-mps-control -d") < text.index("$KUBERAY_GEN_RAY_START_CMD")
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    mps = load_config(ROOT / "deployments" / "gpu-mps.yaml").mps
    assert env["CUDA_MPS_LOG_DIRECTORY"] == mps.log_dir


def test_host_strategy_shares_the_node_daemon() -> None:
    (path,) = (p for p in MANIFESTS if p.stem.endswith("host"))
    docs = documents(path)
    daemon = docs["DaemonSet"]["spec"]["template"]["spec"]
    assert daemon["hostIPC"] and daemon["hostPID"]
    assert "nvidia-cuda-mps-control -d" in script(daemon["containers"][0])
    host_pipe = next(v["hostPath"]["path"] for v in daemon["volumes"] if v["name"] == "mps-pipe")
    pod = worker_pod(docs["RayService"])["spec"]
    assert pod["hostIPC"] and pod["hostPID"]
    assert {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}["mps-pipe"] == (
        host_pipe
    )
    mps = load_config(ROOT / "deployments" / "gpu-mps-host.yaml").mps
    assert mps.daemon == "external"  # mpsserve must not start a daemon of its own in the pod
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["mps-pipe"] == mps.pipe_dir
    daemon_mounts = {m["name"]: m["mountPath"] for m in daemon["containers"][0]["volumeMounts"]}
    assert daemon_mounts["mps-pipe"] == mps.pipe_dir
    text = script(pod["containers"][0])
    assert "nvidia-cuda-mps-control -d" not in text  # waits for the node's daemon instead
    assert text.index("get_server_list") < text.index("$KUBERAY_GEN_RAY_START_CMD")
    uids = {daemon["containers"][0]["securityContext"]["runAsUser"]}
    uids.add(pod["securityContext"]["runAsUser"])
    assert uids == {1000}  # one UID: MPS serves one user's clients at a time


def test_generator_script_is_idempotent_on_the_manifests(tmp_path: Path) -> None:
    """The embedding step alone, on copies: a second run changes nothing."""
    script_text = (ROOT / "scripts" / "gen_serve_configs.sh").read_text()
    embed = script_text[script_text.index("import re") : script_text.rindex("PY")]
    copies = []
    for path in MANIFESTS:
        copy_path = tmp_path / path.name
        copy_path.write_text(path.read_text())
        copies.append(str(copy_path))
    subprocess.run(
        [sys.executable, "-", *copies],
        input=embed,
        cwd=ROOT,
        check=True,
        text=True,
        capture_output=True,
    )
    for path in MANIFESTS:
        assert (tmp_path / path.name).read_text() == path.read_text()


@pytest.mark.parametrize("name", SERVICES)
def test_serve_config_for_a_known_cluster_round_trips(
    name: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`serve-config --cluster-gpus N --cluster-cpus C`: each model's settings in its own
    deployment's overrides, read back into the same service config."""
    monkeypatch.chdir(ROOT)
    capsys.readouterr()
    path = f"deployments/{name}.yaml"
    args = ["serve-config", "--config", path, "--cluster-gpus", "2", "--cluster-cpus", "64"]
    assert main(args) == 0
    data = yaml.safe_load(capsys.readouterr().out)
    (app,) = validate_serve(data).applications
    assert set(app.args) == {"config", "models"}
    assert "models" not in app.args["config"]
    back = service_config_from_serve(data, name, check_files=False)
    assert back == load_config(ROOT / path).as_deployed()
