"""The model deployments' request router class (``RequestRouterConfig``).

Serve imports this module and ships it *by value* (cloudpickle) to every process that holds a
handle to a model deployment, so it holds no state and imports what it publishes to at call
time: the copy Serve runs reaches the process's real ``replica_set`` module.
"""

from __future__ import annotations

from ray.serve._private.request_router.pow_2_router import PowerOfTwoChoicesRequestRouter
from ray.serve.request_router import RunningReplica


class PublishingRouter(PowerOfTwoChoicesRequestRouter):
    """Serve's power-of-two router (for calls through a handle) that also hands every
    replica-set update to this process's ``replica_set`` listeners."""

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        from mpsserve.serving import replica_set  # the process's module, not a shipped copy

        deployment = (self._deployment_id.app_name, self._deployment_id.name)
        replica_set.publish(deployment, replica_set.entries(replicas))
