"""What a redeploy changes, in words: the service config a cluster runs beside a new one.

``describe_changes`` compares two service configs field by field (pure, no Ray);
``deployed_config`` reads the config the cluster runs from Serve's controller (the
application's last applied config); ``live_summary`` says what runs. ``mpsserve deploy``
(mpsserve/ops/deploy.py) logs the changes before it deploys; ``python -m mpsserve.ops.redeploy``
also logs what runs after.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mpsserve.config import ModelConfig, ServiceConfig
from mpsserve.errors import MpsServeError

SECTIONS = ("ingress", "mps", "ray", "transport")


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
        changes = _field_changes(
            getattr(old, section).model_dump(mode="json"),
            getattr(new, section).model_dump(mode="json"),
        )
        if changes:
            lines.append(f"{section}: " + "; ".join(changes))
    return lines or ["no change: the cluster already runs this config"]


def rollout(old: ServiceConfig | None, new: ServiceConfig) -> str:
    """How Serve applies the change: version policies travel as ``user_config`` (replicas
    reconfigure in place); anything else changes the application's args, whose hash is the
    code version of every deployment, so every replica is replaced, a few at a time."""
    from mpsserve.serving.app import application_schema

    if old is None:
        return "rollout: a new application"
    if application_schema(old) == application_schema(new):
        return "rollout: nothing to do"
    if application_schema(old)["args"] == application_schema(new)["args"]:
        return "rollout: in place (version policies only; no replica restarts)"
    return "rollout: rolling update (every replica is replaced by one with the new config)"


def deployed_config(app_name: str) -> ServiceConfig | None:
    """The service config the running application was last deployed with, from Serve's
    controller; None when no such application runs. Needs a connected Ray with Serve."""
    from ray.serve.context import _get_global_client

    from mpsserve.serving.app import service_config_from_serve

    client = _get_global_client(raise_if_no_controller_running=False)
    if client is None:
        return None
    app = (client.get_serve_details().get("applications") or {}).get(app_name) or {}
    deployed = app.get("deployed_app_config")
    if not deployed:
        return None
    return service_config_from_serve(
        {"applications": [deployed]}, f"the deployed application {app_name!r}", check_files=False
    )


def say(line: str) -> None:
    print(line, flush=True)  # a job's log interleaves with Ray's: no buffering


def print_changes(
    config: ServiceConfig, cluster_gpus: int, out: Callable[[str], None] = say
) -> None:
    """Log what deploying ``config`` changes on the connected cluster (never raises for a
    deployed config it cannot read: the deploy goes on)."""
    name = config.ray.app_name
    try:
        old = deployed_config(name)
    except MpsServeError as exc:
        out(f"changes to application {name!r}: unknown (the deployed config: {exc.message})")
        return
    out(f"changes to application {name!r}:")
    for line in describe_changes(old, config, cluster_gpus):
        out(f"  {line}")
    out(f"  {rollout(old, config)}")


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
