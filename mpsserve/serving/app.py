"""Build the Ray Serve application from a ``ServiceConfig`` and the cluster's GPU count."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any

from ray.serve import Application, Deployment
from ray.serve.config import RequestRouterConfig

from mpsserve.config import (
    ModelConfig,
    MpsConfig,
    ServiceConfig,
    SharedConfig,
    load_config,
    parse_config,
    parse_model,
    parse_shared,
)
from mpsserve.errors import ConfigError, DeadlineExceeded, ModelLoadError, ModelNotReady
from mpsserve.ingress import transport as _transport
from mpsserve.node.hook import replica_runtime_env
from mpsserve.serving import ingress as _ingress
from mpsserve.serving import model as _model
from mpsserve.serving.replica_set import ROUTER_CLASS
from mpsserve.settings import to_env

# serve.deployment turns the classes into Deployments; their stubs do not say so.
logger = logging.getLogger(__name__)

ModelReplica: Deployment = _model.ModelReplica  # type: ignore[assignment]
Ingress: Deployment = _ingress.Ingress  # type: ignore[assignment]


#: glibc malloc settings for every replica process. Each request allocates ~1 MB buffers
#: (the body, tensors); above glibc's default mmap threshold each one is a fresh mapping
#: whose pages fault in on first touch and go back to the kernel on free. Keeping them in
#: the heap cut the ingress's CPU per 2000-row request by ~40% (1.17 -> 0.72 ms, measured
#: with benchmarks.loadgen against the HTTP front on a CPU machine).
PROCESS_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(64 * 2**20),
    "MALLOC_TRIM_THRESHOLD_": str(256 * 2**20),
}


def with_process_env(runtime_env: dict[str, Any]) -> dict[str, Any]:
    return {**runtime_env, "env_vars": {**PROCESS_ENV, **runtime_env.get("env_vars", {})}}


def model_env(model: ModelConfig) -> dict[str, str]:
    """The model's settings in its replicas' environment (``MPSSERVE_MODEL_CONFIG``): Serve
    starts new processes for a deployment whose environment changed, and only for it."""
    return to_env(model_config=model.model_dump_json(exclude={"version_policy"}))


def model_options(
    model: ModelConfig, cluster_gpus: int, mps: MpsConfig | None = None
) -> dict[str, Any]:
    """Ray Serve options for a model: N fractional replicas per GPU (sharing it through MPS
    unless ``mps.mode`` is off), or CPU replicas when the cluster has no GPU."""
    placement = model.placement
    common = {
        # Serve's own bound (handle calls); the data port enforces the same number for the
        # frames of all ingresses together (replica_server).
        "max_ongoing_requests": placement.max_ongoing_requests,
        # Serve's policy for handle calls, and the replica set's feed to the ingresses.
        "request_router_config": RequestRouterConfig(
            request_router_class=ROUTER_CLASS  # type: ignore[arg-type]  # a path is accepted
        ),
        "health_check_period_s": placement.health_check_period_s,
        "health_check_timeout_s": placement.health_check_timeout_s,
        "user_config": {"version_policy": model.version_policy.model_dump(mode="json")},
    }
    if cluster_gpus == 0:
        actor = {
            "num_cpus": placement.cpus_per_replica,
            "num_gpus": 0,
            "runtime_env": {"env_vars": {**PROCESS_ENV, **model_env(model)}},
        }
        return {"num_replicas": placement.cpu_replicas, "ray_actor_options": actor, **common}
    gpus = cluster_gpus if placement.gpus == "auto" else placement.gpus
    if gpus > cluster_gpus:
        raise ConfigError(
            f"model {model.name!r}: placement.gpus is {gpus} "
            f"but the cluster has {cluster_gpus} GPU(s)"
        )
    runtime_env = with_process_env(replica_runtime_env(mps or MpsConfig(), placement))
    runtime_env["env_vars"].update(model_env(model))
    gpu_actor: dict[str, Any] = {
        "num_cpus": placement.cpus_per_replica,
        "num_gpus": placement.num_gpus_per_replica(),
        "runtime_env": runtime_env,
    }
    return {
        "num_replicas": placement.replicas_per_gpu * gpus,
        "ray_actor_options": gpu_actor,
        **common,
    }


def check_mps_mode(config: ServiceConfig, cluster_gpus: int) -> None:
    if config.mps.mode == "on" and cluster_gpus == 0:
        raise ConfigError("mps.mode is 'on' but the Ray cluster has no GPU; use 'auto' or 'off'")


#: 'auto' never sizes the ingress below this: one replica is a single point of failure.
MIN_INGRESS_REPLICAS = 2


def ingress_replicas(config: ServiceConfig, options: dict[str, dict[str, Any]], cpus: float) -> int:
    """``ingress.replicas``, with 'auto' resolved for this cluster: one ingress per model
    replica (each costs about a core at full load, as a model replica does), at most as many
    as the cores the model replicas leave free (and their reservations fit), at least two."""
    if config.ingress.replicas != "auto":
        return config.ingress.replicas
    model_replicas = sum(o["num_replicas"] for o in options.values())
    free = cpus - _model_cpus(options)
    fit = free / config.ingress.cpus_per_replica if config.ingress.cpus_per_replica else free
    return max(MIN_INGRESS_REPLICAS, min(model_replicas, math.floor(free), math.floor(fit)))


def _model_cpus(options: dict[str, dict[str, Any]]) -> float:
    return sum(o["num_replicas"] * o["ray_actor_options"]["num_cpus"] for o in options.values())


def check_cpus(
    config: ServiceConfig, options: dict[str, dict[str, Any]], cpus: float, ingresses: int
) -> None:
    """Refuse up front what Ray could never place: Serve would otherwise wait forever."""
    needed = ingresses * config.ingress.cpus_per_replica + _model_cpus(options)
    if needed > cpus + 1e-9:
        per_model = ", ".join(
            f"{name}: {o['num_replicas']} x {o['ray_actor_options']['num_cpus']:g}"
            for name, o in options.items()
        )
        raise ConfigError(
            f"the replicas need {needed:g} CPUs ({per_model}; ingress: "
            f"{ingresses} x {config.ingress.cpus_per_replica:g}) but the Ray "
            f"cluster has {cpus:g}; lower placement.cpus_per_replica or the replica counts"
        )


def surge_percent(
    model: ModelConfig, options: dict[str, dict[str, Any]], free_cpus: float, free_gpus: float
) -> int:
    """Serve's ``max_surge_percent`` for the model: one replica beyond the target (its new
    replicas start and turn ready before old ones stop, so a replacement never leaves fewer
    serving) when the cluster has room for one more; else 0, as Serve's default: old ones
    stop first and the ingresses' requests wait for a replica (``ingress.request_timeout_s``).
    Room is judged from this app's reservations; surging into room another app holds would
    leave the new replica pending and the rollout stalled."""
    mine = options[model.name]
    actor = mine["ray_actor_options"]
    if free_cpus + 1e-9 < actor["num_cpus"] or free_gpus + 1e-9 < actor["num_gpus"]:
        return 0
    return max(100 // max(int(mine["num_replicas"]), 1), 1)


def deployment_options(
    config: ServiceConfig, cluster_gpus: int, cluster_cpus: float
) -> tuple[dict[str, dict[str, Any]], int]:
    """Every model deployment's Serve options and the ingress replica count, for this
    cluster; refuses what the cluster cannot place."""
    check_mps_mode(config, cluster_gpus)
    options = {m.name: model_options(m, cluster_gpus, config.mps) for m in config.models}
    ingresses = ingress_replicas(config, options, cluster_cpus)
    check_cpus(config, options, cluster_cpus, ingresses)
    free_cpus = cluster_cpus - ingresses * config.ingress.cpus_per_replica - _model_cpus(options)
    free_gpus = cluster_gpus - sum(
        o["num_replicas"] * o["ray_actor_options"]["num_gpus"] for o in options.values()
    )
    for m in config.models:
        options[m.name]["max_surge_percent"] = surge_percent(m, options, free_cpus, free_gpus)
    return options, ingresses


def _application(
    shared: SharedConfig,
    names: list[str],
    options: dict[str, dict[str, Any]],
    ingresses: int = MIN_INGRESS_REPLICAS,
) -> Application:
    """The application's graph: one deployment per model (``options``: each one's Serve
    options, or none where the Serve config's deployment overrides give them) and the
    ingress, which learns the model replicas' data ports from Serve's replica set of each
    (``serving.replica_set``). The init args hold only what ``shared`` and ``names`` say:
    a model's settings reach its replicas through its options (``model_options``)."""
    _transport.rotate(shared.ray.app_name)  # each build a new data-port key (see transport)
    transport = _transport.TransportSpec.of(shared)
    embeddings = shared.embeddings.model_dump(mode="json") if shared.embeddings else None
    router = RequestRouterConfig(request_router_class=ROUTER_CLASS)  # type: ignore[arg-type]
    models = {
        name: ModelReplica.options(
            name=f"model-{name}",
            **{"request_router_config": router, **options.get(name, {})},
        ).bind(name, transport, embeddings)
        for name in names
    }
    ingress = Ingress.options(
        num_replicas=ingresses,
        # Time for requests in flight to finish when Serve replaces an ingress replica.
        graceful_shutdown_timeout_s=shared.ingress.request_timeout_s + 15,
        ray_actor_options={
            "num_cpus": shared.ingress.cpus_per_replica,
            "runtime_env": {"env_vars": dict(PROCESS_ENV)},
        },
    )
    return ingress.bind(names, shared.ingress.model_dump(mode="json"), models, transport)


def build_app(config: ServiceConfig, cluster_gpus: int, cluster_cpus: float) -> Application:
    """The whole application with every option in code (``serve.run``, and the app builder
    of a Serve config that carries the whole service config in its args)."""
    options, ingresses = deployment_options(config, cluster_gpus, cluster_cpus)
    logger.info(
        "ingress replicas: %d%s", ingresses, " (auto)" if config.ingress.replicas == "auto" else ""
    )
    names = [m.name for m in config.models]
    return _application(SharedConfig.of(config), names, options, ingresses)


def serve_options(config: ServiceConfig) -> dict[str, Any]:
    """``serve.start`` options: Serve's own proxies are off; mpsserve's ingress replicas
    bind ``ingress.http_port`` and ``ingress.grpc_port`` themselves."""
    return {"proxy_location": "Disabled"}


APP_BUILDER = "mpsserve.serving.app:app_builder"


def app_builder(args: dict[str, Any]) -> Application:
    """Serve's application builder (``import_path``), for ``serve deploy FILE``, KubeRay's
    ``serveConfigV2`` and ``mpsserve deploy``. ``args`` holds either

    - ``config`` (the shared sections: ingress, mps, ray, transport) and ``models`` (the
      model names): each model's settings and Serve options are its deployment's overrides
      in the Serve config (``application_schema`` with the cluster's counts), so a change
      to one model's settings leaves the args, and every other deployment, as they are; or
    - the whole service config inline (``config``, models included) or a YAML path on the
      cluster's nodes (``config_file``), for a cluster whose shape was not known when the
      file was written: options are computed here, and ``cluster_gpus`` and
      ``cluster_cpus`` default to what the Ray cluster has now. Any change but a version
      policy then changes the args, and Serve replaces every replica.
    """
    if ("config" in args) == ("config_file" in args):
        raise ConfigError("the application's args need exactly one of 'config', 'config_file'")
    if "models" in args:
        shared = parse_shared(args["config"], "the application's args")
        return _application(shared, [str(n) for n in args["models"]], {})
    # Built on any node of the cluster: the token and certificate files are checked by the
    # ingress replicas, where they are used.
    if "config_file" in args:
        config = load_config(args["config_file"], check_files=False)
    else:
        config = parse_config(args["config"], "the application's args", check_files=False)
    gpus, cpus = args.get("cluster_gpus"), args.get("cluster_cpus")
    if gpus is None or cpus is None:
        import ray

        resources = ray.cluster_resources()
        gpus = resources.get("GPU", 0) if gpus is None else gpus
        cpus = resources.get("CPU", 0) if cpus is None else cpus
    return build_app(config, int(gpus), float(cpus))


#: A model deployment's options that its override in a Serve config carries (the request
#: router stays in code: Serve hashes an override's router into every deployment's version).
OVERRIDES = (
    "num_replicas",
    "max_ongoing_requests",
    "health_check_period_s",
    "health_check_timeout_s",
    "max_surge_percent",
    "user_config",
    "ray_actor_options",
)


def application_schema(
    config: ServiceConfig, cluster_gpus: int | None = None, cluster_cpus: float | None = None
) -> dict[str, Any]:
    """The Serve application config for ``config``.

    With the cluster's GPU and CPU counts (``mpsserve deploy``, ``mpsserve serve``, the
    redeploy job, ``serve-config --cluster-gpus N --cluster-cpus C``): the args carry only
    the shared sections and the model names; each model deployment's override carries its
    Serve options, its version policy (``user_config``: a change reconfigures replicas in
    place) and its settings (``ray_actor_options``' environment: a change replaces that
    model's replicas, rolling, and nothing else); the ingress's override its replica count.
    Serve hashes the args into the code version of every deployment, so only a change to
    the shared sections or to the set of models restarts everything.

    Without them: the whole config in the args (see ``app_builder``), version policies as
    overrides."""
    if cluster_gpus is None or cluster_cpus is None:
        return _whole_config_schema(config, cluster_gpus, cluster_cpus)
    options, ingresses = deployment_options(config, cluster_gpus, cluster_cpus)
    models = [
        {"name": f"model-{name}", **{k: o[k] for k in OVERRIDES}} for name, o in options.items()
    ]
    return {
        "name": config.ray.app_name,
        "route_prefix": None,  # no Serve proxy: the ingress binds its own ports
        "import_path": APP_BUILDER,
        "args": {
            "config": SharedConfig.of(config).model_dump(mode="json"),
            "models": [m.name for m in config.models],
        },
        "deployments": [{"name": "ingress", "num_replicas": ingresses}, *models],
    }


def _whole_config_schema(
    config: ServiceConfig, cluster_gpus: int | None, cluster_cpus: float | None
) -> dict[str, Any]:
    body = config.model_dump(mode="json")
    body["ray"] = config.ray.deployed().model_dump(mode="json")
    for model in body["models"]:
        model.pop("version_policy")
    args: dict[str, Any] = {"config": body}
    if cluster_gpus is not None:
        args["cluster_gpus"] = cluster_gpus
    if cluster_cpus is not None:
        args["cluster_cpus"] = cluster_cpus
    return {
        "name": config.ray.app_name,
        "route_prefix": None,  # no Serve proxy: the ingress binds its own ports
        "import_path": APP_BUILDER,
        "args": args,
        "deployments": [
            {
                "name": f"model-{m.name}",
                "user_config": {"version_policy": m.version_policy.model_dump(mode="json")},
            }
            for m in config.models
        ],
    }


def serve_config(
    config: ServiceConfig, cluster_gpus: int | None = None, cluster_cpus: float | None = None
) -> dict[str, Any]:
    """A Serve config file (``serve deploy FILE``) for ``config``: for a cluster of these
    counts, or, without them, one whose counts are read when the application is built."""
    app = application_schema(config, cluster_gpus, cluster_cpus)
    return {**serve_options(config), "applications": [app]}


def service_config_from_serve(
    data: dict[str, Any], source: str, check_files: bool = True
) -> ServiceConfig:
    """The mpsserve service config inside a Serve config file (its mpsserve application);
    ``check_files`` as for ``parse_config``."""
    apps = [a for a in data.get("applications") or [] if a.get("import_path") == APP_BUILDER]
    if len(apps) != 1:
        raise ConfigError(
            f"{source}: a Serve config for mpsserve holds exactly one application with "
            f"import_path {APP_BUILDER}; found {len(apps)}"
        )
    app = apps[0]
    args = app.get("args") or {}
    if "config_file" in args:
        return load_config(args["config_file"], check_files)
    overrides = {d.get("name"): d for d in app.get("deployments") or []}
    body = dict(args.get("config") or {})
    if "models" in args:
        body["models"] = [_model_from_override(overrides, str(n), source) for n in args["models"]]
    policies = {
        d["name"].removeprefix("model-"): d["user_config"]["version_policy"]
        for d in overrides.values()
        if "version_policy" in (d.get("user_config") or {})
    }
    body["models"] = [
        {**m, "version_policy": policies[m["name"]]} if m.get("name") in policies else m
        for m in body.get("models") or []
    ]
    return parse_config(body, source, check_files)


def _model_from_override(overrides: dict[str, Any], name: str, source: str) -> dict[str, Any]:
    """A model's settings as its deployment's override carries them (``model_env``)."""
    override = overrides.get(f"model-{name}") or {}
    env = ((override.get("ray_actor_options") or {}).get("runtime_env") or {}).get("env_vars")
    text = (env or {}).get(MODEL_CONFIG_VAR)
    if not isinstance(text, str):
        raise ConfigError(
            f"{source}: deployment 'model-{name}' has no {MODEL_CONFIG_VAR} in its "
            "ray_actor_options.runtime_env.env_vars (the model's settings)"
        )
    return parse_model(text, f"{source}, model-{name}").model_dump(
        mode="json", exclude={"version_policy"}
    )


MODEL_CONFIG_VAR = next(iter(to_env(model_config="")))


def deploy(
    config: ServiceConfig,
    cluster_gpus: int,
    cluster_cpus: float,
    timeout_s: float = 900.0,
    progress: Callable[[str], None] = print,
) -> None:
    """Apply the app declaratively (as ``serve deploy`` does) and wait until it runs.
    The cluster's Serve applications become exactly this one."""
    from ray import serve
    from ray.serve.context import _get_global_client  # what `serve deploy` reaches, in-process
    from ray.serve.schema import ApplicationStatus, ServeDeploySchema

    schema = ServeDeploySchema.parse_obj(
        {"applications": [application_schema(config, cluster_gpus, cluster_cpus)]}
    )
    client = _get_global_client()
    if client is None:
        raise ModelNotReady("Ray Serve is not running here; start it first (serve.start)")
    client.deploy_apps(schema)
    name, started, said = config.ray.app_name, time.monotonic(), 0.0
    while time.monotonic() - started < timeout_s:
        app = serve.status().applications.get(name)
        if app is not None and app.status == ApplicationStatus.RUNNING:
            wait_routable(config, timeout_s - (time.monotonic() - started))
            return
        if app is not None and app.status == ApplicationStatus.DEPLOY_FAILED:
            raise ModelLoadError(f"application {name!r} failed to deploy: {app.message}")
        if time.monotonic() - said >= 10:
            said = time.monotonic()
            state = app.status.value if app is not None else "submitted"
            progress(f"  ... {name}: {state} ({said - started:.0f}s)")
        time.sleep(0.5)
    raise DeadlineExceeded(f"application {name!r} not running after {timeout_s:g}s")


def wait_routable(config: ServiceConfig, timeout_s: float = 60.0) -> None:
    """Wait until every ingress routes to a replica of every model: Serve pushes the
    replica set to each ingress over its long poll, so a just-RUNNING application can take
    a moment more to take requests."""
    from ray import serve

    handle = serve.get_deployment_handle("ingress", app_name=config.ray.app_name)
    wanted = {m.name for m in config.models}
    deadline = time.monotonic() + max(timeout_s, 1.0)
    while True:
        views = handle.broadcast("describe").results(timeout_s=10, return_exceptions=True)
        routed = set.intersection(
            *[{e["model"] for e in v["endpoints"]} if isinstance(v, dict) else set() for v in views]
            or [set()]
        )
        if wanted <= routed:
            return
        if time.monotonic() > deadline:
            raise DeadlineExceeded(
                f"the ingress routes to no replica of {sorted(wanted - routed)} "
                f"after {timeout_s:g}s"
            )
        time.sleep(0.2)
