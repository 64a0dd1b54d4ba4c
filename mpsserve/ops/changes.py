"""What a redeploy changes, in words: the service config a cluster runs beside a new one.

``describe_changes`` compares two service configs field by field, and ``plan`` says what
Serve restarts for the change, per deployment, by Serve's own rule (both pure, no Ray);
``deployed_app`` and ``deployed_config`` read what the cluster runs from Serve's controller
(the application's last applied config); ``live_summary`` says what runs. ``mpsserve deploy``
and ``python -m mpsserve.ops.redeploy`` (mpsserve/ops/deploy.py) log the changes and the
plan before they deploy, the endpoints and what runs after.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mpsserve.config import ModelConfig, ServiceConfig
from mpsserve.errors import MpsServeError

SECTIONS = ("ingress", "mps", "ray", "transport", "embeddings")


def _section(config: ServiceConfig, section: str) -> Any:
    """A shared section as the application runs it, as plain data: ``ray`` holds only its
    name (the rest says how a cluster is started, which a deploy onto a running one does not
    change); {} for an absent optional one (embeddings)."""
    value = getattr(config.as_deployed(), section)
    return {} if value is None else value.model_dump(mode="json")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted paths to leaf values: {"placement.cpu_replicas": 1, ...}."""
    if not isinstance(data, dict):
        return {prefix: data}
    flat: dict[str, Any] = {}
    for key, value in data.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else key))
    return flat


def _field_changes(old: Any, new: Any) -> list[str]:
    before, after = _flatten(old), _flatten(new)
    return [
        f"{path} {before.get(path)} -> {after.get(path)}"
        for path in sorted(before.keys() | after.keys())
        if before.get(path) != after.get(path)
    ]


def replica_count(model: ModelConfig, cluster_gpus: int) -> int:
    """Replicas the model gets on a cluster with this many GPUs (the app builder's rule)."""
    from mpsserve.serving.app import model_options

    return int(model_options(model, cluster_gpus)["num_replicas"])


def _model_changes(old: ModelConfig, new: ModelConfig, cluster_gpus: int | None) -> list[str]:
    changes = []
    if cluster_gpus is not None:
        try:
            before, after = replica_count(old, cluster_gpus), replica_count(new, cluster_gpus)
        except MpsServeError:  # placement.gpus beyond the cluster: the deploy will say so
            before = after = 0
        if before != after:
            changes.append(f"replicas {before} -> {after}")
    if old.version_policy != new.version_policy:
        changes.append(f"version_policy {old.version_policy.text()} -> {new.version_policy.text()}")
    exclude = {"version_policy"}
    changes += _field_changes(
        old.model_dump(mode="json", exclude=exclude), new.model_dump(mode="json", exclude=exclude)
    )
    return changes


def describe_changes(
    old: ServiceConfig | None, new: ServiceConfig, cluster_gpus: int | None = None
) -> list[str]:
    """One line per changed model or section, e.g. ``model rec: replicas 1 -> 2;
    version_policy latest 1 -> specific [1]; placement.cpu_replicas 1 -> 2``. With
    ``cluster_gpus`` the replica counts are those the cluster will run."""
    if old is None:
        return [f"first deploy: models {[m.name for m in new.models]}"]
    lines = []
    old_models = {m.name: m for m in old.models}
    new_models = {m.name: m for m in new.models}
    for name in old_models.keys() - new_models.keys():
        lines.append(f"model {name}: removed")
    for name, model in new_models.items():
        if name not in old_models:
            lines.append(f"model {name}: added (store {model.store})")
            continue
        changes = _model_changes(old_models[name], model, cluster_gpus)
        if changes:
            lines.append(f"model {name}: " + "; ".join(changes))
    for section in SECTIONS:
        changes = _field_changes(_section(old, section), _section(new, section))
        if changes:
            lines.append(f"{section}: " + "; ".join(changes))
    return lines or ["no change: the cluster already runs this config"]


#: Serve's rule (ray/serve/_private/version.py ``DeploymentVersion``, config.py's
#: ``update_type`` of each option): a deployment's replicas are replaced when its code
#: version (a hash of the application's import path, runtime_env and args) or one of these
#: options changes ...
RESTART_OPTIONS = (
    "ray_actor_options",
    "placement_group_bundles",
    "placement_group_strategy",
    "placement_group_bundle_label_selector",
    "placement_group_fallback_strategy",
    "max_replicas_per_node",
    "gang_scheduling_config",
    "deployment_actors",
)
#: ... each running replica's ``reconfigure`` is called when one of these does ...
RECONFIGURE_OPTIONS = (
    "user_config",
    "max_ongoing_requests",
    "autoscaling_config",
    "logging_config",
    "graceful_shutdown_wait_loop_s",
    "backpressure_config",
)
#: ... and these only change what the controller does (health checks, scaling, rollouts).
CONTROLLER_OPTIONS = (
    "health_check_period_s",
    "health_check_timeout_s",
    "graceful_shutdown_timeout_s",
    "max_constructor_retry_count",
    "max_queued_requests",
    "max_surge_percent",
    "rolling_update_percentage",
)
#: Serve's default share of a deployment's replicas replaced at a time.
ROLLING_UPDATE_SHARE = 0.2


def code_version_inputs(app: dict[str, Any]) -> dict[str, Any]:
    """What Serve hashes into every deployment's code version (``get_app_code_version``)."""
    deployments = app.get("deployments") or []
    return {
        "import_path": app.get("import_path"),
        "runtime_env": app.get("runtime_env") or {},
        "args": app.get("args") or {},
        "autoscaling_policy": app.get("autoscaling_policy"),
        "routers": [d.get("request_router_config") for d in deployments],
        "deployment_actors": [d.get("deployment_actors") for d in deployments],
    }


def _options_changed(old: dict[str, Any], new: dict[str, Any], names: tuple[str, ...]) -> bool:
    return any(old.get(name) != new.get(name) for name in names)


def _rolling(new: dict[str, Any], replicas: int) -> str:
    """How Serve replaces ``replicas`` of a deployment with ``new``'s options."""
    target = int(new.get("num_replicas") or replicas)
    batch = max(int(ROLLING_UPDATE_SHARE * target), 1)
    order = (
        "new ones start and turn ready before old ones stop"
        if (new.get("max_surge_percent") or 0) > 0
        else "old ones stop first"
    )
    return f"rolling replace of {replicas} replica(s), {batch} at a time, {order}"


def deployment_plan(
    old: dict[str, Any] | None,
    new: dict[str, Any],
    rebuilt: bool,
    running: int | None,
    reason: str,
) -> str:
    """What Serve does to one deployment: ``old``/``new`` its overrides in the deployed and
    the new application config, ``rebuilt`` whether the code version changes, ``running``
    its replicas now (None: read from ``old``), ``reason`` what changed, in words."""
    if old is None and running is None:
        return f"new ({new.get('num_replicas', 1)} replica(s))"
    replicas = running if running is not None else int((old or {}).get("num_replicas") or 1)
    before, after = (old or {}).get("num_replicas"), new.get("num_replicas")
    scaled = ""
    if before is not None and after is not None and before != after:
        scaled = f"; scaled {before} -> {after}"
    why = f" ({reason})" if reason else ""
    if rebuilt or _options_changed(old or {}, new, RESTART_OPTIONS):
        return f"{_rolling(new, replicas)}{scaled}{why}"
    if _options_changed(old or {}, new, RECONFIGURE_OPTIONS):
        return f"reconfigured in place, no restart{scaled}{why}"
    if scaled:
        return f"{scaled.removeprefix('; ')}, no restart of the running ones{why}"
    if _options_changed(old or {}, new, CONTROLLER_OPTIONS):
        return f"Serve's settings only, no restart{why}"
    return "unchanged"


def plan(
    old_app: dict[str, Any] | None,
    new_app: dict[str, Any],
    old: ServiceConfig | None,
    new: ServiceConfig,
    running: dict[str, int] | None = None,
) -> list[str]:
    """One line per deployment: what deploying ``new_app`` (the Serve application config of
    ``new``) over ``old_app`` (the one the cluster runs, from ``old``) restarts, by Serve's
    rule. ``running``: each deployment's replicas now, where known. Pure."""
    names = ["ingress", *(f"model-{m.name}" for m in new.models)]
    if old_app is None or old is None:
        return [f"{name}: new" for name in names]
    running = running or {}
    rebuilt = code_version_inputs(old_app) != code_version_inputs(new_app)
    old_over = {d["name"]: d for d in old_app.get("deployments") or []}
    new_over = {d["name"]: d for d in new_app.get("deployments") or []}
    shared = _shared_changes(old, new)
    lines = []
    for name in names:
        if rebuilt and name not in running and name not in old_over:
            lines.append(f"{name}: new")
            continue
        reason = shared if rebuilt else _deployment_reason(name, old, new)
        line = deployment_plan(
            old_over.get(name), new_over.get(name, {}), rebuilt, running.get(name), reason
        )
        lines.append(f"{name}: {line}")
    gone = {m.name for m in old.models} - {m.name for m in new.models}
    lines += [f"model-{name}: removed (its replicas stop)" for name in sorted(gone)]
    return lines


def _shared_changes(old: ServiceConfig, new: ServiceConfig) -> str:
    """Why the application's args changed (every deployment restarts), in words."""
    changed = [s for s in SECTIONS if _section(old, s) != _section(new, s)]
    if [m.name for m in old.models] != [m.name for m in new.models]:
        changed.insert(0, "the set of models")
    what = ", ".join(changed) if changed else "their layout (the Serve config's format)"
    return f"the application's args changed: {what}"


def _deployment_reason(name: str, old: ServiceConfig, new: ServiceConfig) -> str:
    """The changed settings behind a deployment's own change."""
    if name == "ingress":
        return ""  # its settings are in the args: a change there rebuilds
    model = name.removeprefix("model-")
    before = next((m for m in old.models if m.name == model), None)
    after = next(m for m in new.models if m.name == model)
    return "; ".join(_model_changes(before, after, None)) if before else ""


def deployed_app(app_name: str) -> dict[str, Any] | None:
    """The application config the running application was last deployed with, as Serve's
    controller keeps it; None when no such application runs. Needs a connected Ray."""
    from ray.serve.context import _get_global_client

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    app = (client.get_serve_details().get("applications") or {}).get(app_name) or {}
    return app.get("deployed_app_config") or None


def deployed_config(app_name: str) -> ServiceConfig | None:
    """The service config the running application was last deployed with, from Serve's
    controller; None when no such application runs. Needs a connected Ray with Serve."""
    from mpsserve.serving.app import service_config_from_serve

    deployed = deployed_app(app_name)
    if not deployed:
        return None
    return service_config_from_serve(
        {"applications": [deployed]}, f"the deployed application {app_name!r}", check_files=False
    )


def say(line: str) -> None:
    print(line, flush=True)  # a job's log interleaves with Ray's: no buffering


def print_changes(
    config: ServiceConfig, cluster_gpus: int, cluster_cpus: float, out: Callable[[str], None] = say
) -> None:
    """Log what deploying ``config`` changes on the connected cluster and what Serve will
    restart for it, per deployment (never raises for a deployed config it cannot read: the
    deploy goes on)."""
    from mpsserve.serving.app import application_schema

    name = config.ray.app_name
    new_app = application_schema(config, cluster_gpus, cluster_cpus)
    try:
        old_app = deployed_app(name)
        old = deployed_config(name)
    except MpsServeError as exc:
        out(f"changes to application {name!r}: unknown (the deployed config: {exc.message})")
        return
    out(f"changes to application {name!r}:")
    for line in describe_changes(old, config, cluster_gpus):
        out(f"  {line}")
    out("what restarts:")
    for line in plan(old_app, new_app, old, config, running_replicas(name)):
        out(f"  {line}")


def running_replicas(app_name: str) -> dict[str, int]:
    """Each deployment's replicas now (every state but stopping), from Serve's status."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return {}
    return {
        name: sum(n for state, n in d.replica_states.items() if _text(state) != "STOPPING")
        for name, d in app.deployments.items()
    }


def live_summary(app_name: str) -> list[str]:
    """What runs now: each deployment's status and replica states."""
    from ray import serve

    app = serve.status().applications.get(app_name)
    if app is None:
        return [f"application {app_name!r}: not running"]
    lines = [f"application {app_name!r}: {_text(app.status)}"]
    for name, deployment in sorted(app.deployments.items()):
        counts = sorted((_text(state), n) for state, n in deployment.replica_states.items())
        states = ", ".join(f"{n} {state}" for state, n in counts)
        lines.append(f"  {name}: {_text(deployment.status)}, replicas {states or 'none'}")
    return lines


def _text(status: object) -> str:
    """A Serve status enum's value (they are str enums; some fields hold plain strings)."""
    return str(getattr(status, "value", status))
