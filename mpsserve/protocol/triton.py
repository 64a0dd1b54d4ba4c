"""Triton's extensions of KServe v2, as documents: model configuration, statistics and the
model repository index, in the JSON shape Triton's REST API returns (protobuf JSON with the
proto's field names, numbers as numbers); ``kserve_grpc`` turns the same documents into the
gRPC messages, so each shape is declared once, here.

Pure functions over plain data: a model's metadata and its replicas' states (what
``ModelReplica.repository_state`` reports), and the summed counters of ``ingress.stats``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mpsserve.errors import InvalidInput
from mpsserve.protocol.tensors import DATATYPE_TO_NUMPY, numpy_to_datatype
from mpsserve.text import quote

#: The durations Triton reports per model version, in its order.
DURATIONS = (
    "success",
    "fail",
    "queue",
    "compute_input",
    "compute_infer",
    "compute_output",
    "cache_hit",
    "cache_miss",
)

#: A ``VersionPolicy`` as JSON: ``{"latest": N, "specific": [..] | None}``.
PolicyDict = dict[str, Any]

#: KServe v2 datatype -> Triton's model-config DataType name (BYTES is TYPE_STRING there).
CONFIG_DATATYPE = {
    name: "TYPE_STRING" if name == "BYTES" else f"TYPE_{name}" for name in DATATYPE_TO_NUMPY
}
#: The runtime's v2 platform -> Triton's backend name.
BACKENDS = {"tensorflow_savedmodel": "tensorflow", "pytorch_export": "pytorch"}
#: Triton's model states in the repository index.
READY, UNAVAILABLE, LOADING = "READY", "UNAVAILABLE", "LOADING"
#: The one key of a load request's "config" parameter this server takes (with "name").
OVERRIDABLE = frozenset({"name", "version_policy"})


def datatype(dtype: str) -> str:
    """A tensor's v2 datatype from the numpy dtype name a replica reports (or a v2 name)."""
    return dtype if dtype in DATATYPE_TO_NUMPY else numpy_to_datatype(np.dtype(dtype))


def _tensor(spec: Mapping[str, Any], is_input: bool) -> dict[str, Any]:
    dims = [-1 if d is None else int(d) for d in spec.get("shape", ())]
    entry: dict[str, Any] = {
        "name": str(spec["name"]),
        "data_type": CONFIG_DATATYPE[datatype(str(spec["dtype"]))],
    }
    if is_input:
        entry["format"] = "FORMAT_NONE"
    entry["dims"] = dims
    return entry


def version_policy(policy: PolicyDict) -> dict[str, Any]:
    """Our ``VersionPolicy`` (its JSON dump) as Triton's ``ModelVersionPolicy``."""
    if policy.get("specific"):
        return {"specific": {"versions": [int(v) for v in policy["specific"]]}}
    return {"latest": {"num_versions": int(policy.get("latest") or 1)}}


def instance_groups(name: str, states: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Triton's instance groups from the replicas that answered: one group per kind, its
    count the replicas of that kind, a GPU group's ``gpus`` the devices they hold (each an
    MPS client sharing the GPU with the others)."""
    groups: dict[str, dict[str, Any]] = {}
    for state in states:
        kind = "KIND_GPU" if state.get("device") == "gpu" else "KIND_CPU"
        group = groups.setdefault(kind, {"name": name, "kind": kind, "count": 0, "gpus": []})
        group["count"] += 1
        for gpu in state.get("gpus", ()):
            if str(gpu).isdigit() and int(gpu) not in group["gpus"]:
                group["gpus"].append(int(gpu))
    for group in groups.values():
        group["gpus"].sort()
        if not group["gpus"]:
            del group["gpus"]
    return list(groups.values())


def model_config(
    name: str, metadata: Mapping[str, Any], states: Sequence[Mapping[str, Any]]
) -> dict[str, Any]:
    """Triton's model configuration: what the model takes and returns (``max_batch_size``
    0: ``dims`` include the rows dimension, -1 where it varies), where its replicas run
    (``instance_group``) and its version policy; mpsserve's own knobs are ``parameters``."""
    platform = str(metadata.get("platform", ""))
    first = states[0] if states else {}
    config: dict[str, Any] = {
        "name": name,
        "platform": platform,
        "backend": BACKENDS.get(platform, ""),
        "version_policy": version_policy(first.get("policy") or {}),
        "max_batch_size": 0,
        "input": [_tensor(spec, True) for spec in metadata.get("inputs", ())],
        "output": [_tensor(spec, False) for spec in metadata.get("outputs", ())],
        "instance_group": instance_groups(name, states),
    }
    parameters = {
        "ragged_features": ",".join(metadata.get("ragged_features", ())),
        "signature_name": first.get("signature"),
        "max_rows": first.get("max_rows"),
    }
    config["parameters"] = {
        key: {"string_value": str(value)} for key, value in parameters.items() if value
    }
    return config


def model_statistics(name: str, version: str, counters: Mapping[str, Any]) -> dict[str, Any]:
    """One ``model_stats`` entry (counts and nanoseconds as Triton sums them)."""
    durations = {
        key: {"count": int(counters[key][0]), "ns": int(counters[key][1])} for key in DURATIONS
    }
    return {
        "name": name,
        "version": version,
        "last_inference": int(counters["last_inference"]),
        "inference_count": int(counters["inference_count"]),
        "execution_count": int(counters["execution_count"]),
        "inference_stats": durations,
        "batch_stats": [],
        "memory_usage": [],
    }


def index_entries(name: str, states: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The repository index's entries of one model: each complete version in its store,
    READY where a replica serves it, else UNAVAILABLE (or LOADING) with the reason."""
    if not states:
        return [{"name": name, "state": UNAVAILABLE, "reason": "no replica is running"}]
    serving = {str(s["serving"]) for s in states if s.get("serving") is not None}
    versions: set[int] = {int(v) for s in states for v in s.get("versions", ())}
    versions |= {int(v) for v in serving}
    entries = [_index_entry(name, v, states, serving) for v in sorted(versions)]
    return entries or [{"name": name, "state": UNAVAILABLE, "reason": _empty_reason(states)}]


def _index_entry(
    name: str, version: int, states: Sequence[Mapping[str, Any]], serving: set[str]
) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "version": str(version)}
    if str(version) in serving:
        return {**entry, "state": READY}
    if any(s.get("unloaded") for s in states):
        return {**entry, "state": UNAVAILABLE, "reason": "unloaded"}
    failed = [s["failed"][str(version)] for s in states if str(version) in s.get("failed", {})]
    if failed:
        return {**entry, "state": UNAVAILABLE, "reason": str(failed[0])}
    if any(s.get("loading") == version for s in states):
        return {**entry, "state": LOADING}
    policy = str(states[0].get("policy_text", ""))
    return {**entry, "state": UNAVAILABLE, "reason": f"not selected by version policy {policy}"}


def _empty_reason(states: Sequence[Mapping[str, Any]]) -> str:
    errors = [str(s["error"]) for s in states if s.get("error")]
    return errors[0] if errors else "no complete version in the store"


def load_policy(name: str, parameters: Mapping[str, Any]) -> PolicyDict | None:
    """The version policy a load request asks for (its ``config`` parameter, Triton's model
    configuration as JSON), or None: load with the policy in force. Model files cannot be
    uploaded (``file:`` parameters): versions come from the store."""
    for key in parameters:
        if key.startswith("file:"):
            raise InvalidInput(
                f"load parameter {quote(key, 64)}: model files cannot be uploaded here; "
                "publish the version to the model's store"
            )
    raw = parameters.get("config")
    if raw is None or raw == "":
        return None
    doc = _config_json(raw)
    extra = sorted(set(doc) - OVERRIDABLE)
    if extra:
        raise InvalidInput(
            f"load config: only version_policy can be changed here, not {extra}; the rest "
            "comes from the service config (mpsserve deploy)"
        )
    if "name" in doc and doc["name"] != name:
        raise InvalidInput(f"load config names model {quote(str(doc['name']), 64)}, not {name!r}")
    return policy_from_config(doc.get("version_policy"))


def _config_json(raw: Any) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        doc = json.loads(raw)
    except (TypeError, ValueError):
        raise InvalidInput('load parameter "config" is not a JSON object') from None
    if not isinstance(doc, dict):
        raise InvalidInput('load parameter "config" is not a JSON object')
    return doc


def policy_from_config(doc: Any) -> PolicyDict | None:
    """Triton's ``version_policy`` as our ``VersionPolicy`` fields; ``all`` is refused (a
    replica serves one version at a time)."""
    if doc is None:
        return None
    if not isinstance(doc, dict) or len(doc) != 1:
        raise InvalidInput("version_policy must hold exactly one of latest, specific")
    ((kind, body),) = doc.items()
    body = body if isinstance(body, dict) else {}
    if kind == "latest":
        count = body.get("num_versions", 1)
        if not isinstance(count, int) or isinstance(count, bool) or count < 1:
            raise InvalidInput("version_policy.latest.num_versions must be a positive integer")
        return {"latest": count, "specific": None}
    if kind == "specific":
        versions = body.get("versions")
        if not isinstance(versions, list) or not versions:
            raise InvalidInput("version_policy.specific.versions must list versions")
        try:
            pinned = sorted({int(v) for v in versions})
        except (TypeError, ValueError):
            raise InvalidInput("version_policy.specific.versions must be integers") from None
        if pinned[0] < 1:
            raise InvalidInput("version_policy.specific.versions must be positive")
        return {"latest": None, "specific": pinned}
    if kind == "all":
        raise InvalidInput(
            "version_policy 'all' is not served: each replica serves one version at a time; "
            "use latest or specific"
        )
    raise InvalidInput(f"unknown version_policy {quote(str(kind), 32)}")
