"""Deploying a service to Ray: join or start the cluster, log what changes, deploy (ops).

Shared by the CLI (``mpsserve serve``, ``mpsserve deploy``) and the ``ray job submit``
entrypoint (``python -m mpsserve.ops.redeploy``), which both sit above this module. Ray is
imported inside the functions: ``use_cluster_token`` must run before Ray's import, and the
CLI's other commands stay fast.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from mpsserve.config import ServiceConfig, load_config
from mpsserve.errors import MpsServeError
from mpsserve.ops.changes import live_summary, print_changes, say
from mpsserve.ops.cluster import Target, Watchdog, cluster_line, join, resolve
from mpsserve.settings import settings

#: How long a refused address is tried again: `ray start --head` binds its port seconds after
#: it is launched, and a deploy often follows it at once. Status does not wait (a dead
#: address fails at once there).
HEAD_STARTING_S = 15.0


class Cluster(NamedTuple):
    gpus: int
    cpus: float
    address: str = ""  # the GCS, host:port
    session_dir: str = ""
    dashboard: str = "(off)"


def use_cluster_token() -> None:
    """Ray 2.60's `ray start` turns on token auth, but a client only sends the token when
    RAY_AUTH_MODE=token; join such a cluster as `ray` itself would, if the user set no mode."""
    has_token = Path.home().joinpath(".ray", "auth_token").exists() or any(
        os.environ.get(name) for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH")
    )
    if has_token and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = "token"


def start_ray(config: ServiceConfig, target: Target, watchdog: Watchdog | None = None) -> Cluster:
    """Join the target cluster (``mpsserve serve``'s own local head, started by
    ``mpsserve.ops.localray``, or one named by an address), then Serve; returns the
    cluster's resources and where it is."""
    use_cluster_token()  # before Ray is imported: it reads the mode once, at import
    import ray
    from ray import serve

    # deploy often follows `ray start` at once: a head still coming up gets a few seconds
    context = join(target, watchdog=watchdog, starting_s=HEAD_STARTING_S)
    print(cluster_line(target, context.address_info), flush=True)
    from mpsserve.serving.app import serve_options

    serve.start(**serve_options(config))
    info: dict[str, Any] = getattr(context, "address_info", {})
    resources = ray.cluster_resources()
    return Cluster(
        gpus=int(resources.get("GPU", 0)),
        cpus=float(resources.get("CPU", 0)),
        address=str(info.get("gcs_address") or ""),
        session_dir=str(info.get("session_dir") or ""),
        dashboard=f"http://{context.dashboard_url}" if context.dashboard_url else "(off)",
    )


def deploy_to(config: ServiceConfig, cluster: Cluster) -> None:
    from mpsserve.serving.app import deploy

    gpus = cluster.gpus
    placement = (
        "CPU replicas (no GPU in the cluster, so no MPS)"
        if gpus == 0
        else f"{gpus} GPU(s), MPS mode {config.mps.mode}"
    )
    print(f"deploying {[m.name for m in config.models]} on {placement} ...", flush=True)
    deploy(config, gpus, cluster.cpus, progress=lambda line: print(line, flush=True))


def load_service(path: str) -> ServiceConfig:
    """A service YAML, or a Serve config file holding the mpsserve application. Token and
    certificate files are not looked for here: they are needed where the ingress runs,
    which checks them when it starts."""
    import yaml

    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        data = None  # load_config says what is wrong with it
    if isinstance(data, dict) and "applications" in data:
        from mpsserve.serving.app import service_config_from_serve

        return service_config_from_serve(data, path, check_files=False)
    return load_config(path, check_files=False)


def deploy(path: str, address: str | None, watchdog: Watchdog | None = None) -> ServiceConfig:
    """``mpsserve deploy``: the service (YAML or Serve config) onto a running cluster. Logs
    what the deploy changes there and what Serve will restart for it, per deployment,
    before deploying; the endpoints and what runs after. Returns the config deployed. The
    cluster: the explicit address, else the app's (``mpsserve.ops.cluster.resolve``)."""
    config = load_service(path)
    target = resolve(config.ray.app_name, address, config.ray.address, path)
    cluster = start_ray(config, target, watchdog)
    print_changes(config, cluster.gpus, cluster.cpus)
    deploy_to(config, cluster)
    say(f"deployed application {config.ray.app_name!r}; HTTP on port {config.ingress.http_port}")
    for line in endpoint_lines(config, cluster.address.rpartition(":")[0] or "127.0.0.1"):
        say(f"  {line}")
    say("now live:")
    for line in live_summary(config.ray.app_name):
        say(f"  {line}")
    return config


def endpoint_lines(config: ServiceConfig, node: str) -> list[str]:
    """Where clients reach the service: the ingress's host, or ``node`` (an address of the
    cluster) where it listens on every address."""
    ingress = config.ingress
    host = node if ingress.host in ("0.0.0.0", "::", "") else ingress.host
    base = f"{'https' if ingress.tls else 'http'}://{host}:{ingress.http_port}"
    lines = [f"HTTP (KServe v2): {base}/v2/models/{m.name}/infer" for m in config.models]
    return [
        *lines,
        f"gRPC (KServe v2): {host}:{ingress.grpc_port} inference.GRPCInferenceService",
        f"TF-Serving REST:  {base}/v1/models/{config.models[0].name}:predict",
        f"health:           {base}/v2/health/ready",
    ]


def run_command(name: str, command: Callable[[], int]) -> int:
    """Run a command with the service's logging; its errors become a message and an exit
    code (2: ours, e.g. a bad config; 1: Ray Serve reporting a failed deployment)."""
    logging.basicConfig(level=settings().log_level, format="%(levelname)s %(name)s: %(message)s")
    try:
        return command()
    except KeyboardInterrupt:
        print(f"mpsserve {name}: interrupted", file=sys.stderr)
        return 130
    except MpsServeError as exc:
        print(f"mpsserve {name}: {exc.message}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # Ray Serve reports a failed deployment this way
        print(f"mpsserve {name}: {exc}", file=sys.stderr)
        return 1
