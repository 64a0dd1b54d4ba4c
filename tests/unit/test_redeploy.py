"""What a redeploy changes, in words; the deployed config read back as Serve stores it."""

from __future__ import annotations

from typing import Any

import pytest

from mpsserve.config import ServiceConfig, parse_config
from mpsserve.ops import changes
from mpsserve.serving.app import application_schema


def service(**model: Any) -> ServiceConfig:
    body: dict[str, Any] = {"name": "rec", "store": "/models/rec", **model}
    return parse_config({"models": [body]})


def test_first_deploy_and_no_change() -> None:
    config = service()
    assert changes.describe_changes(None, config) == ["first deploy: models ['rec']"]
    assert changes.describe_changes(config, config) == [
        "no change: the cluster already runs this config"
    ]
    assert changes.rollout(config, config) == "rollout: nothing to do"


def test_replicas_and_policy_on_a_cpu_cluster() -> None:
    old = service(placement={"cpu_replicas": 1})
    new = service(placement={"cpu_replicas": 2}, version_policy={"specific": [1]})
    assert changes.describe_changes(old, new, cluster_gpus=0) == [
        "model rec: replicas 1 -> 2; version_policy latest 1 -> specific [1]; "
        "placement.cpu_replicas 1 -> 2"
    ]
    assert changes.rollout(old, new).startswith("rollout: rolling update")


def test_replicas_on_a_gpu_cluster_count_every_gpu() -> None:
    old, new = (
        service(placement={"replicas_per_gpu": 8}),
        service(placement={"replicas_per_gpu": 4}),
    )
    (line,) = changes.describe_changes(old, new, cluster_gpus=2)
    assert line.startswith("model rec: replicas 16 -> 8; placement.replicas_per_gpu 8 -> 4")
    (line,) = changes.describe_changes(old, new)  # no cluster: the fields only
    assert line == "model rec: placement.replicas_per_gpu 8 -> 4"


def test_a_policy_alone_reconfigures_in_place() -> None:
    old, new = service(), service(version_policy={"latest": 2})
    assert changes.describe_changes(old, new) == ["model rec: version_policy latest 1 -> latest 2"]
    assert changes.rollout(old, new) == (
        "rollout: in place (version policies only; no replica restarts)"
    )


def test_models_added_removed_and_sections() -> None:
    half = {"gpu_share": 0.5}
    a, b = {"name": "a", "store": "/a", "placement": half}, {"name": "b", "store": "/b"}
    old = parse_config({"models": [a, {**b, "placement": half}]})
    new = parse_config(
        {
            "models": [a, {"name": "c", "store": "s3://bucket/c", "placement": half}],
            "ingress": {"http_port": 8080},
            "mps": {"mode": "off"},
        }
    )
    assert changes.describe_changes(old, new) == [
        "model b: removed",
        "model c: added (store s3://bucket/c)",
        "ingress: http_port 8000 -> 8080",
        "mps: mode auto -> off",
    ]


class FakeClient:
    def __init__(self, details: dict[str, Any]) -> None:
        self.details = details

    def get_serve_details(self) -> dict[str, Any]:
        return self.details


def serve_details(config: ServiceConfig) -> dict[str, Any]:
    """Serve's instance details as `mpsserve deploy` leaves them (cluster counts in args)."""
    app = application_schema(config, cluster_gpus=0, cluster_cpus=4)
    return {"applications": {config.ray.app_name: {"deployed_app_config": app}}}


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch) -> FakeClient:
    import ray.serve.context

    fake = FakeClient({})
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda **_: fake)
    return fake


def test_deployed_config_reads_back_what_was_deployed(client: FakeClient) -> None:
    config = service(version_policy={"specific": [3]}, placement={"cpu_replicas": 3})
    assert changes.deployed_config("mpsserve") is None
    client.details = serve_details(config)
    assert changes.deployed_config("mpsserve") == config
    assert changes.deployed_config("other") is None


def test_print_changes_logs_each_line(client: FakeClient) -> None:
    client.details = serve_details(service())
    lines: list[str] = []
    changes.print_changes(service(placement={"cpu_replicas": 2}), 0, out=lines.append)
    assert lines == [
        "changes to application 'mpsserve':",
        "  model rec: replicas 1 -> 2; placement.cpu_replicas 1 -> 2",
        "  rollout: rolling update (every replica is replaced by one with the new config)",
    ]


def test_print_changes_goes_on_when_the_deployed_config_is_unreadable(client: FakeClient) -> None:
    details = serve_details(service())
    details["applications"]["mpsserve"]["deployed_app_config"]["args"]["config"]["bogus"] = 1
    client.details = details
    lines: list[str] = []
    changes.print_changes(service(), 0, out=lines.append)
    assert len(lines) == 1 and "unknown" in lines[0] and "bogus" in lines[0]


def test_live_summary_lists_each_deployment(monkeypatch: pytest.MonkeyPatch) -> None:
    from ray import serve
    from ray.serve.schema import (
        ApplicationStatus,
        ApplicationStatusOverview,
        DeploymentStatus,
        DeploymentStatusOverview,
        DeploymentStatusTrigger,
        ReplicaState,
        ServeStatus,
    )

    deployment = DeploymentStatusOverview(
        status=DeploymentStatus.HEALTHY,
        status_trigger=DeploymentStatusTrigger.CONFIG_UPDATE_COMPLETED,
        replica_states={ReplicaState.RUNNING: 2, ReplicaState.STOPPING: 1},
        message="",
    )
    app = ApplicationStatusOverview(
        status=ApplicationStatus.RUNNING,
        message="",
        last_deployed_time_s=0,
        deployments={"model-rec": deployment},
    )
    monkeypatch.setattr(serve, "status", lambda: ServeStatus(applications={"mpsserve": app}))
    assert changes.live_summary("mpsserve") == [
        "application 'mpsserve': RUNNING",
        "  model-rec: HEALTHY, replicas 2 RUNNING, 1 STOPPING",
    ]
    assert changes.live_summary("other") == ["application 'other': not running"]
