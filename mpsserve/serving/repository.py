"""The ingress's ``ModelAdmin`` over Ray Serve: every replica asked through Serve's
``broadcast`` (a control-plane call to each replica actor, not the data ports, so a replica
at its in-flight bound still answers), and a model deployment's ``user_config`` changed
through Serve's controller, as ``mpsserve deploy`` changes a version policy.

Changing ``user_config`` re-applies the application's declarative config with that one
deployment's ``user_config`` changed: Serve reconfigures the model's replicas in place (no
restart) and any replica it starts later gets the same ``user_config``, so replicas never
disagree. The change lasts until the next ``mpsserve deploy``, which applies the service
config again. Serve's calls block, so they run in a worker thread, off the ingress's loop.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from ray.serve.exceptions import DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from mpsserve.errors import ModelLoadError, ModelNotReady

logger = logging.getLogger(__name__)
BROADCAST_TIMEOUT_S = 10.0


class ServeAdmin:
    def __init__(self, handles: dict[str, DeploymentHandle], app_name: str) -> None:
        self.handles, self.app_name = handles, app_name

    async def replica_states(self, model: str) -> list[dict[str, Any]]:
        return await self._broadcast(model, "repository_state")

    async def replica_stats(self, model: str) -> list[dict[str, Any]]:
        return await self._broadcast(model, "stats")

    async def _broadcast(self, model: str, method: str) -> list[dict[str, Any]]:
        """Every running replica's answer; one that fails or is late is left out. Serve
        takes a replica out of its running set while ``reconfigure`` runs (a load after an
        unload), so a model may briefly have none: no answers, not an error."""
        handle = self.handles[model]

        def call() -> list[Any]:
            response = handle.broadcast(method)
            return response.results(timeout_s=BROADCAST_TIMEOUT_S, return_exceptions=True)

        try:
            answers = await asyncio.to_thread(call)
        except DeploymentUnavailableError:  # none running now (one reconfiguring leaves it)
            return []
        except TimeoutError:
            raise ModelNotReady(
                f"the replicas of model {model!r} did not answer within {BROADCAST_TIMEOUT_S:g}s"
            ) from None
        for answer in answers:
            if isinstance(answer, BaseException):
                logger.warning("model %s: a replica did not answer %s: %s", model, method, answer)
        return [a for a in answers if isinstance(a, dict)]

    async def reconfigure(self, model: str, change: dict[str, Any]) -> None:
        await asyncio.to_thread(self._redeploy, model, change)

    def _redeploy(self, model: str, change: dict[str, Any]) -> None:
        """The cluster's declarative config again, with ``model-<model>``'s ``user_config``
        updated by ``change``."""
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeDeploySchema

        client = _get_global_client()
        if client is None:
            raise ModelLoadError("Ray Serve's controller cannot be reached from this ingress")
        apps = client.get_serve_details().get("applications", {})
        configs = {
            name: app["deployed_app_config"]
            for name, app in apps.items()
            if app.get("deployed_app_config")
        }
        mine = configs.get(self.app_name)
        if mine is None:
            raise ModelLoadError(
                f"application {self.app_name!r} was not deployed from a config (serve.run?); "
                "load and unload change its config: deploy it with mpsserve serve or deploy"
            )
        _change_user_config(mine, f"model-{model}", change)
        logger.warning(
            "model %s: repository API changes its user_config by %s (until the next deploy)",
            model,
            change,
        )
        client.deploy_apps(ServeDeploySchema.parse_obj({"applications": list(configs.values())}))


def _change_user_config(app: dict[str, Any], deployment: str, change: dict[str, Any]) -> None:
    deployments = app.setdefault("deployments", [])
    entry = next((d for d in deployments if d.get("name") == deployment), None)
    if entry is None:
        entry = {"name": deployment}
        deployments.append(entry)
    entry["user_config"] = {**(entry.get("user_config") or {}), **change}
