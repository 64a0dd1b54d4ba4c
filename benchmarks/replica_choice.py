"""What choosing a model replica costs an ingress, per request, for each way Serve offers.

    python -m benchmarks.replica_choice [--replicas 4] [--picks 300] [--json out.json]

Starts a local Ray cluster and one deployment of ``--replicas`` replicas that publish a
data-port address (``record_replica_metadata``) and use mpsserve's request router class, then
times, from this driver (a handle here routes as one in an ingress does):

* ``choose_replica_reserve``: ``async with handle.choose_replica(): pass`` - Serve's request
  router (power of two), a ``reserve_slot`` actor call (the replica's semaphore: a bound
  global across ingresses) and a ``release_slot`` call on exit. We never ``dispatch``.
* ``choose_replica_pick_only``: the same with ``_reserve=False`` (Serve's internal opt-out):
  the router's pick without reservation, so no global bound.
* ``replica_set_least_loaded``: the replica set Serve pushes (``replica_set.subscribe``) and
  ``Router._pick`` (``LeastLoaded``) on the caller's loop, plus the release.

A custom request router class run through ``choose_replica`` costs what the first two do
(the policy is microseconds; the calls and loop hops are the cost). Prints microseconds per
pick (median of ``--rounds`` rounds); CPU-only is fine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle

from mpsserve.ingress.router import Router
from mpsserve.protocol.handshake import Keyring
from mpsserve.serving import replica_set


class EchoReplica:
    def record_replica_metadata(self) -> dict[str, Any]:
        return {"model": "echo", "host": "127.0.0.1", "port": 1, "pid": os.getpid()}

    def __call__(self) -> str:
        return "ok"


# Called, not used as a class decorator: mypy then knows the result is a Deployment.
Echo = serve.deployment(
    name="echo",
    ray_actor_options={"num_cpus": 0},
    max_ongoing_requests=8,
    request_router_config=RequestRouterConfig(
        request_router_class=replica_set.ROUTER_CLASS  # type: ignore[arg-type]  # a path is accepted
    ),
)(EchoReplica)


async def time_choose(handle: DeploymentHandle, picks: int, reserve: bool) -> float:
    """Microseconds per ``choose_replica`` enter + exit."""
    kwargs = {} if reserve else {"_reserve": False}
    started = time.perf_counter()
    for _ in range(picks):
        async with handle.choose_replica(**kwargs) as selection:
            assert selection.replica_metadata["port"] == 1
    return (time.perf_counter() - started) / picks * 1e6


async def time_replica_set(handle: DeploymentHandle, replicas: int, picks: int) -> float:
    """Microseconds per pick over the replica set Serve pushed (and its release)."""
    router = Router({"echo": 8}, keys=Keyring.generate)
    loop = asyncio.get_running_loop()

    def listener(entries: list[dict[str, Any]]) -> None:
        loop.call_soon_threadsafe(router.update, "echo", entries)

    replica_set.subscribe(handle, listener)
    while len(router.endpoints("echo")) < replicas:
        await asyncio.sleep(0.05)
    started = time.perf_counter()
    for _ in range(picks):
        endpoint = router._pick("echo", set())
        assert endpoint is not None
        endpoint.in_flight -= 1
    elapsed = time.perf_counter() - started
    replica_set.unsubscribe(handle, listener)
    return elapsed / picks * 1e6


async def measure(handle: DeploymentHandle, args: argparse.Namespace) -> dict[str, float]:
    await time_choose(handle, 20, True)  # warm: router started, queue lengths probed
    rounds: dict[str, list[float]] = {k: [] for k in CANDIDATES}
    for _ in range(args.rounds):
        rounds["choose_replica_reserve"].append(await time_choose(handle, args.picks, True))
        rounds["choose_replica_pick_only"].append(await time_choose(handle, args.picks, False))
        rounds["replica_set_least_loaded"].append(
            await time_replica_set(handle, args.replicas, args.picks * 100)
        )
    return {k: round(statistics.median(v), 2) for k, v in rounds.items()}


CANDIDATES = ("choose_replica_reserve", "choose_replica_pick_only", "replica_set_least_loaded")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replicas", type=int, default=4)
    parser.add_argument("--picks", type=int, default=300, help="per round (x100 for the set)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    try:
        serve.start(proxy_location="Disabled")
        handle = serve.run(
            Echo.options(num_replicas=args.replicas).bind(), name="bench", route_prefix=None
        )
        figures = asyncio.run(measure(handle, args))
    finally:
        serve.shutdown()
        ray.shutdown()
    for name, us in figures.items():
        print(f"{name:<28}{us:>12.2f} us per pick")
    if args.json:
        args.json.write_text(json.dumps({"replicas": args.replicas, "us_per_pick": figures}))


if __name__ == "__main__":
    main()
