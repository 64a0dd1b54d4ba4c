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


RUNNING = {"ingress": 2, "model-rec": 1, "model-other": 2}
HALF = {"gpu_share": 0.5}


def plan_of(
    old: ServiceConfig, new: ServiceConfig, cpus: float = 8, running: dict[str, int] = RUNNING
) -> list[str]:
    old_app, new_app = schemas(old, new, cpus=cpus)
    return changes.plan(old_app, new_app, old, new, running)


def schemas(*configs: ServiceConfig, cpus: float = 8) -> list[dict[str, Any]]:
    """The Serve application configs `mpsserve deploy` submits on a CPU cluster."""
    return [application_schema(c, cluster_gpus=0, cluster_cpus=cpus) for c in configs]


def two_models(rec: dict[str, Any] | None = None, **sections: Any) -> ServiceConfig:
    models = [
        {"name": "rec", "store": "/models/rec", "placement": HALF, **(rec or {})},
        {"name": "other", "store": "/models/other", "placement": {**HALF, "cpu_replicas": 2}},
    ]
    return parse_config({"models": models, **sections})


def test_one_models_settings_replace_only_its_replicas() -> None:
    """What `mpsserve deploy` prints before deploying, by Serve's rule: the changed model's
    environment is new (its replicas are replaced), nothing else changed (the app's args
    are the same, so no other deployment's version is)."""
    old, new = two_models(), two_models({"intra_op_threads": 2})
    old_app, new_app = schemas(old, new)
    assert old_app["args"] == new_app["args"]
    assert changes.plan(old_app, new_app, old, new, RUNNING) == [
        "ingress: unchanged",
        "model-rec: rolling replace of 1 replica(s), 1 at a time, new ones start and turn "
        "ready before old ones stop (intra_op_threads 0 -> 2)",
        "model-other: unchanged",
    ]


def test_no_room_for_an_extra_replica_stops_old_ones_first() -> None:
    old, new = two_models(), two_models({"warmup_rows": 4})
    (line,) = [x for x in plan_of(old, new, cpus=4) if "rec:" in x]
    assert "old ones stop first (warmup_rows 8 -> 4)" in line


def test_shared_settings_or_the_set_of_models_restart_every_deployment() -> None:
    old = two_models()
    new = two_models(ingress={"request_timeout_s": 20})
    assert plan_of(old, new) == [
        f"{name}: rolling replace of {n} replica(s), 1 at a time, {order} (the application's "
        "args changed: ingress)"
        for name, n, order in [
            ("ingress", 2, "old ones stop first"),
            ("model-rec", 1, "new ones start and turn ready before old ones stop"),
            ("model-other", 2, "new ones start and turn ready before old ones stop"),
        ]
    ]
    alone = service()
    lines = plan_of(alone, old, running={"ingress": 2, "model-rec": 1})
    assert lines[2] == "model-other: new"
    assert "the application's args changed: the set of models" in lines[0]
    lines = plan_of(old, alone)
    assert lines[-1] == "model-other: removed (its replicas stop)"


def test_a_whole_config_app_is_rebuilt_once() -> None:
    """An app deployed from a Serve config without the cluster's counts (its args hold the
    whole config): the first per-model deploy over it changes the args' layout."""
    config = two_models()
    old_app = application_schema(config)
    (new_app,) = schemas(config)
    lines = changes.plan(old_app, new_app, config, config, RUNNING)
    assert all("args changed: their layout" in line for line in lines), lines


def test_serve_config_round_trips_with_the_cluster_counts() -> None:
    from mpsserve.serving.app import serve_config, service_config_from_serve

    config = two_models({"version_policy": {"specific": [2]}, "tf32": True})
    data = serve_config(config, 0, 8)
    assert set(data["applications"][0]["args"]) == {"config", "models"}
    assert service_config_from_serve(data, "test", check_files=False) == config.as_deployed()


def test_first_deploy_and_no_change() -> None:
    config = service()
    assert changes.describe_changes(None, config) == ["first deploy: models ['rec']"]
    assert changes.describe_changes(config, config) == [
        "no change: the cluster already runs this config"
    ]
    app = application_schema(config, 0, 4)
    assert changes.plan(None, app, None, config) == ["ingress: new", "model-rec: new"]
    assert changes.plan(app, app, config, config) == ["ingress: unchanged", "model-rec: unchanged"]


def test_replicas_and_policy_on_a_cpu_cluster() -> None:
    old = service(placement={"cpu_replicas": 1})
    new = service(placement={"cpu_replicas": 2}, version_policy={"specific": [1]})
    assert changes.describe_changes(old, new, cluster_gpus=0) == [
        "model rec: replicas 1 -> 2; version_policy latest 1 -> specific [1]; "
        "placement.cpu_replicas 1 -> 2"
    ]
    assert plan_of(old, new)[1] == (
        "model-rec: rolling replace of 1 replica(s), 1 at a time, new ones start and turn "
        "ready before old ones stop; scaled 1 -> 2 (version_policy latest 1 -> specific [1]; "
        "placement.cpu_replicas 1 -> 2)"
    )


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
    assert plan_of(old, new) == [
        "ingress: unchanged",
        "model-rec: reconfigured in place, no restart (version_policy latest 1 -> latest 2)",
    ]


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
    assert changes.deployed_config("mpsserve") == config.as_deployed()
    assert changes.deployed_config("other") is None


def test_print_changes_logs_each_line(client: FakeClient, monkeypatch: pytest.MonkeyPatch) -> None:
    client.details = serve_details(service())
    lines: list[str] = []
    monkeypatch.setattr(changes, "running_replicas", lambda _: {"ingress": 2, "model-rec": 1})
    changes.print_changes(service(placement={"cpu_replicas": 2}), 0, 4, out=lines.append)
    assert lines == [
        "changes to application 'mpsserve':",
        "  model rec: replicas 1 -> 2; placement.cpu_replicas 1 -> 2",
        "what restarts:",
        "  ingress: unchanged",
        "  model-rec: rolling replace of 1 replica(s), 1 at a time, new ones start and turn "
        "ready before old ones stop; scaled 1 -> 2 (placement.cpu_replicas 1 -> 2)",
    ]


def test_print_changes_goes_on_when_the_deployed_config_is_unreadable(client: FakeClient) -> None:
    details = serve_details(service())
    details["applications"]["mpsserve"]["deployed_app_config"]["args"]["config"]["bogus"] = 1
    client.details = details
    lines: list[str] = []
    changes.print_changes(service(), 0, 4, out=lines.append)
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


def test_endpoint_lines_name_a_node_where_the_ingress_listens_everywhere() -> None:
    from mpsserve.ops.deploy import endpoint_lines

    config = parse_config(
        {
            "models": [{"name": "rec", "store": "/r", "placement": HALF}],
            "ingress": {"host": "0.0.0.0", "http_port": 8100, "grpc_port": 9100},
        }
    )
    assert endpoint_lines(config, "10.0.0.5")[:2] == [
        "HTTP (KServe v2): http://10.0.0.5:8100/v2/models/rec/infer",
        "gRPC (KServe v2): 10.0.0.5:9100 inference.GRPCInferenceService",
    ]


def serve_version(app: dict[str, Any], name: str) -> Any:
    """Ray Serve's own ``DeploymentVersion`` of a deployment of ``app`` (its override on
    Serve's defaults; the code version: the app's code-version inputs)."""
    import json

    from ray.serve._private.config import DeploymentConfig
    from ray.serve._private.version import DeploymentVersion

    (override,) = [d for d in app["deployments"] if d["name"] == name]
    options = {k: v for k, v in override.items() if k not in ("name", "ray_actor_options")}
    code = json.dumps(changes.code_version_inputs(app), sort_keys=True)
    return DeploymentVersion(code, DeploymentConfig(**options), override.get("ray_actor_options"))


@pytest.mark.parametrize(
    "rec",
    [
        {"intra_op_threads": 2},
        {"store": "/models/elsewhere"},
        {"version_policy": {"latest": 2}},
        {"placement": {**HALF, "cpus_per_replica": 0.5}},
        {"placement": {**HALF, "health_check_period_s": 2}},
        {},
    ],
)
def test_the_plan_follows_serves_own_rule(rec: dict[str, Any]) -> None:
    """Whatever one model's change, the plan says what Serve's ``DeploymentVersion`` decides
    for each model deployment: replaced, reconfigured in place, or left as it is."""
    old, new = two_models(), two_models(rec)
    old_app, new_app = schemas(old, new)
    lines = dict(line.split(": ", 1) for line in changes.plan(old_app, new_app, old, new, RUNNING))
    for name in ("model-rec", "model-other"):
        before, after = serve_version(old_app, name), serve_version(new_app, name)
        said = lines[name]
        assert said.startswith("rolling replace") == before.requires_actor_restart(after), said
        in_place = before.requires_actor_reconfigure(after) and not said.startswith("rolling")
        assert said.startswith("reconfigured in place") == in_place, said
        assert (said == "unchanged") == (before == after), said
    assert lines["model-other"] == "unchanged" and lines["ingress"] == "unchanged"
