"""Build the Ray Serve application from a ``ServiceConfig`` and the cluster's GPU count."""

from __future__ import annotations

from typing import Any

from ray.serve import Application, Deployment

from mpsserve.config import ModelConfig, ServiceConfig
from mpsserve.errors import ConfigError
from mpsserve.serving import ingress as _ingress
from mpsserve.serving import model as _model

# serve.deployment turns the classes into Deployments; their stubs do not say so.
ModelReplica: Deployment = _model.ModelReplica  # type: ignore[assignment]
Ingress: Deployment = _ingress.Ingress  # type: ignore[assignment]


def model_options(model: ModelConfig, cluster_gpus: int) -> dict[str, Any]:
    """Ray Serve options for a model: N fractional replicas per GPU, or CPU replicas."""
    placement = model.placement
    common = {"max_ongoing_requests": placement.max_ongoing_requests}
    if cluster_gpus == 0:
        actor = {"num_cpus": placement.cpus_per_replica, "num_gpus": 0}
        return {"num_replicas": placement.cpu_replicas, "ray_actor_options": actor, **common}
    gpus = cluster_gpus if placement.gpus == "auto" else placement.gpus
    if gpus > cluster_gpus:
        raise ConfigError(
            f"model {model.name!r}: placement.gpus is {gpus} "
            f"but the cluster has {cluster_gpus} GPU(s)"
        )
    actor = {"num_cpus": placement.cpus_per_replica, "num_gpus": placement.num_gpus_per_replica()}
    return {"num_replicas": placement.replicas_per_gpu * gpus, "ray_actor_options": actor, **common}


def check_mps_mode(config: ServiceConfig, cluster_gpus: int) -> None:
    if config.mps.mode == "on" and cluster_gpus == 0:
        raise ConfigError("mps.mode is 'on' but the Ray cluster has no GPU; use 'auto' or 'off'")


def build_app(config: ServiceConfig, cluster_gpus: int) -> Application:
    """One model deployment per model, behind one ingress."""
    check_mps_mode(config, cluster_gpus)
    handles = {
        m.name: ModelReplica.options(name=f"model-{m.name}", **model_options(m, cluster_gpus)).bind(
            m.model_dump(mode="json")
        )
        for m in config.models
    }
    ingress = Ingress.options(
        num_replicas=config.ingress.replicas,
        ray_actor_options={"num_cpus": config.ingress.cpus_per_replica},
    )
    return ingress.bind(handles, config.ingress.model_dump(mode="json"))
