"""Triton's extensions of KServe v2, transport-free: model configuration, statistics and the
model repository (index, load, unload). REST and gRPC call these methods and only translate.

What a model's replicas know (their state, their counters) comes through a ``ModelAdmin``:
production's asks every replica through Ray Serve and changes a model deployment's
``user_config`` through Serve's controller (``serving.repository``); without one (tests of
the adapters) configuration falls back to the metadata and the rest is unavailable.

Load and unload change what every replica serves, so they take the path a version policy
change takes (``mpsserve deploy``): the model deployment's ``user_config`` changes, Serve
calls each replica's ``reconfigure``, each replica loads, warms and swaps as for hot reload.
The call returns once every replica reports the outcome (or fails with the replicas'
reasons). They are refused (403 / PERMISSION_DENIED) unless ``ingress.repository_api`` is on:
Triton answers UNAVAILABLE when its model control mode forbids them, but a refusal by
configuration is not a transient condition a client should retry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from mpsserve.config import VersionPolicy
from mpsserve.errors import (
    DeadlineExceeded,
    Forbidden,
    ModelLoadError,
    ModelNotFound,
    ModelNotReady,
)
from mpsserve.ingress import stats as _stats
from mpsserve.ingress.health import HealthBoard, Plane
from mpsserve.protocol import triton
from mpsserve.text import bound_message, quote

LOAD_TIMEOUT_S = 300.0  # longest a load or unload waits for every replica's outcome
LOAD_POLL_S = 0.5
QUOTE = "'"  # names quoted as repr() quotes them, like the data plane's errors
REFUSED = (
    "the model repository API's load and unload are turned off on this server "
    "(ingress.repository_api: false)"
)


class ModelAdmin(Protocol):
    """What the ingress asks of a model's replicas beyond inference (all of them)."""

    async def replica_states(self, model: str) -> list[dict[str, Any]]: ...

    async def replica_stats(self, model: str) -> list[dict[str, Any]]: ...

    async def reconfigure(self, model: str, change: dict[str, Any]) -> None: ...


class Extensions:
    def __init__(
        self,
        dataplane: Plane,
        health: HealthBoard,
        admin: ModelAdmin | None,
        repository_api: bool,
    ) -> None:
        self.dataplane, self.health = dataplane, health
        self.admin, self.repository_api = admin, repository_api

    async def _states(self, model: str) -> list[dict[str, Any]]:
        return await self.admin.replica_states(model) if self.admin is not None else []

    # -- model configuration --------------------------------------------------------------

    async def model_config(self, name: str, version: str | None = None) -> dict[str, Any]:
        """Triton's model configuration (``triton.model_config``)."""
        metadata = await self.dataplane.model_metadata(name, version)
        states = await self._states(name)
        if not states:  # no admin: what this ingress knows
            states = [{"device": (await self.dataplane.backend(name).metadata()).get("device")}]
        return triton.model_config(name, metadata, states)

    # -- statistics -----------------------------------------------------------------------

    async def statistics(
        self, name: str | None = None, version: str | None = None
    ) -> list[dict[str, Any]]:
        """Triton's ``model_stats``: each model (or ``name``) and version, summed over its
        replicas; a served version with no request yet has zero counts."""
        names = [name] if name else self.dataplane.models()
        for model in names:
            self.dataplane.backend(model)  # unknown: 404
        entries: list[dict[str, Any]] = []
        for model in names:
            entries += await self._model_statistics(model, version)
        return entries

    async def _model_statistics(self, model: str, version: str | None) -> list[dict[str, Any]]:
        if self.admin is None:
            raise ModelNotReady("statistics are gathered from the model replicas through Serve")
        answers = await self.admin.replica_stats(model)
        totals = _stats.merge(a["versions"] for a in answers)
        for served in {a["serving"] for a in answers if a.get("serving")}:
            totals.setdefault(served, _stats.empty())
        totals.pop("", None)  # failures while nothing was served
        if version is not None:
            if version not in totals:
                raise ModelNotFound(
                    f"model {quote(model, mark=QUOTE)} version {quote(version, mark=QUOTE)} "
                    f"has no statistics: it is not served; versions {sorted(totals)}"
                )
            totals = {version: totals[version]}
        ordered = sorted(totals.items(), key=lambda item: _version_key(item[0]))
        return [triton.model_statistics(model, v, counters) for v, counters in ordered]

    # -- model repository -----------------------------------------------------------------

    async def index(self, ready_only: bool = False) -> list[dict[str, Any]]:
        """Triton's repository index: every model and version with its state."""
        entries: list[dict[str, Any]] = []
        for model in self.dataplane.models():
            entries += triton.index_entries(model, await self._states(model))
        for entry in entries:
            if "reason" in entry:
                entry["reason"] = bound_message(entry["reason"])
        return [e for e in entries if e["state"] == triton.READY] if ready_only else entries

    def _allowed(self, name: str) -> None:
        if not self.repository_api:
            raise Forbidden(REFUSED)
        self.dataplane.backend(name)  # unknown: 404
        if self.admin is None:
            raise ModelLoadError("no model admin: load and unload need the Serve deployment")

    async def load(self, name: str, parameters: Mapping[str, Any]) -> None:
        """Load (or reload) ``name``, with the version policy of a ``config`` parameter when
        given; returns once every replica serves a version that policy selects."""
        self._allowed(name)
        policy = triton.load_policy(name, parameters)
        change: dict[str, Any] = {"loaded": True}
        if policy is not None:
            change["version_policy"] = VersionPolicy.model_validate(policy).model_dump(mode="json")
        assert self.admin is not None
        await self.admin.reconfigure(name, change)
        await self._wait(name, lambda states: _loaded(name, states, change.get("version_policy")))
        self.dataplane.serving[name] = True
        await self.health.set(name, True)

    async def unload(self, name: str, parameters: Mapping[str, Any]) -> None:
        """Unload ``name`` on every replica (they stay up and load nothing until a load)."""
        self._allowed(name)
        assert self.admin is not None
        await self.admin.reconfigure(name, {"loaded": False})
        await self._wait(name, _unloaded)
        self.dataplane.serving[name] = False
        await self.health.set(name, False)

    async def _wait(self, name: str, done: Any) -> None:
        deadline = time.monotonic() + LOAD_TIMEOUT_S
        while True:
            states = await self._states(name)
            if states and done(states):
                return
            if time.monotonic() > deadline:
                raise DeadlineExceeded(
                    f"model {name!r}: the replicas did not all finish within "
                    f"{LOAD_TIMEOUT_S:g}s; see the repository index"
                )
            await asyncio.sleep(LOAD_POLL_S)


def _version_key(version: str) -> tuple[int, str]:
    return (int(version), "") if version.isdigit() else (2**63, version)


def _unloaded(states: Sequence[Mapping[str, Any]]) -> bool:
    return all(s.get("unloaded") and s.get("serving") is None for s in states)


def _loaded(name: str, states: Sequence[Mapping[str, Any]], wanted: Any) -> bool:
    """Every replica has the policy asked for and serves a version it selects; a replica
    for which every selected version failed ends the wait with their reasons."""
    for state in states:
        if state.get("unloaded") or (wanted is not None and state.get("policy") != wanted):
            return False
        policy = VersionPolicy.model_validate(state["policy"])
        selected = [str(v) for v in policy.selected([int(v) for v in state["versions"]])]
        if not selected:
            raise ModelLoadError(
                f"model {name!r}: no complete version in the store matches version policy "
                f"{policy.text()} (complete: {state['versions']})"
            )
        if state.get("serving") in selected and state.get("loading") is None:
            continue
        failed = {v: state["failed"][v] for v in selected if v in state.get("failed", {})}
        if len(failed) == len(selected):
            reasons = "; ".join(f"version {v}: {r}" for v, r in failed.items())
            raise ModelLoadError(bound_message(f"model {name!r} did not load: {reasons}"))
        return False
    return True
