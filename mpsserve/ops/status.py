"""``mpsserve status``: one screen for an operator, read from the running cluster.

Everything comes from Ray Serve: applications and deployments from ``serve.status()``; every
running model replica answers ``metadata`` and every ingress ``entry`` through Serve's
``broadcast`` (an actor call to each replica Serve runs: served version, GPU, MPS attach
state, its node's MPS daemon as the guardian saw it, its in-flight peak; for an ingress where
it listens and its last 60 seconds of traffic). A replica that does not answer shows as a row
with its error.

Versions: replicas of one model that answer with different versions are a split. A split is
normal for a moment (a new version reaches each replica at its own next poll), so it is a
problem only once it is older than the replicas' own bound (``converge_within_s``); its age is
counted from the most recent version change among them, which never overstates it. Versions
that failed to load are listed with their reason and how many replicas report them; they are
a problem only through their effects (a replica that serves nothing does not answer).
"""

from __future__ import annotations

import time
from typing import Any

from mpsserve.config import EmbeddingsConfig

MODEL_PREFIX = "model-"  # the model deployments' names (``serving.app``)
#: A GPU fault's hit clients still there after this make the report unhealthy.
LINGER_S = 30.0


def gather(app_name: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Everything the screen shows, as plain data (the ``--json`` form)."""
    from ray import serve

    status = serve.status()
    applications = {
        name: {
            "status": str(getattr(app.status, "value", app.status)),
            "message": app.message,
            "deployments": {
                dep: {
                    "status": str(getattr(d.status, "value", d.status)),
                    "replicas": {
                        str(getattr(k, "value", k)): v for k, v in d.replica_states.items()
                    },
                }
                for dep, d in app.deployments.items()
            },
        }
        for name, app in status.applications.items()
    }
    report: dict[str, Any] = {"app": app_name, "time": time.time(), "applications": applications}
    if app_name not in applications:
        report["verdict"] = f"PROBLEM: no application {app_name!r} is deployed"
        report["ok"] = False
        return report
    deployments = applications[app_name]["deployments"]
    report["ingresses"] = ingress_entries(app_name, timeout_s)
    report["replicas"] = [
        _replica(answer, name.removeprefix(MODEL_PREFIX))
        for name in sorted(deployments)
        if name.startswith(MODEL_PREFIX)
        for answer in _broadcast(app_name, name, "metadata", timeout_s)
    ]
    report["traffic"] = _traffic(report["ingresses"])
    report["metrics"] = metrics_urls(report["ingresses"])
    report["mps_nodes"] = _nodes(report["replicas"])
    report["models"] = _models(report["replicas"], report["time"])
    report["ok"], report["verdict"] = _verdict(report)
    return report


def with_store(report: dict[str, Any], embeddings: EmbeddingsConfig | None) -> dict[str, Any]:
    """``report`` with the config's embedding store (its ``embeddings`` section) probed: a
    store that does not answer, or whose cluster is not ok, makes the verdict a PROBLEM."""
    if embeddings is None:
        return report
    from mpsserve.embeddings.probe import probe

    found = probe(embeddings)
    report["embeddings"] = found.to_dict()
    if not found.ok:
        rest = str(report["verdict"]).removeprefix("PROBLEM: ").removeprefix("OK: ")
        report["ok"] = False
        report["verdict"] = f"PROBLEM: embedding store: {found.detail}; {rest}"
    return report


def _store_line(report: dict[str, Any]) -> list[str]:
    store = report.get("embeddings")
    if store is None:
        return []
    return [f"embedding store: {'ok' if store['ok'] else 'PROBLEM'}: {store['detail']}"]


#: What each row keeps of a replica's ``metadata["store"]``.
STORE_FIELDS = ("policy", "swaps", "failed", "serving_since", "converge_within_s", "warmup")
#: The split bound assumed for replicas that do not state theirs.
DEFAULT_CONVERGE_S = 120.0


def _broadcast(app_name: str, deployment: str, method: str, timeout_s: float) -> list[Any]:
    """``method``'s answer from every running replica of ``deployment``; a replica that does
    not answer in time is ``{"error": ...}`` (what the screen is for)."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    try:
        answers = handle.broadcast(method).results(timeout_s=timeout_s, return_exceptions=True)
    except TimeoutError as exc:
        return [{"error": f"no answer from {deployment} within {timeout_s:g}s: {exc}"}]
    return [
        {"error": f"{type(a).__name__}: {str(a)[:300]}"} if isinstance(a, BaseException) else a
        for a in answers
    ]


def metrics_targets(ingresses: list[dict[str, Any]]) -> list[str]:
    """Every node's metrics port (``host:port``) as the ingresses say (one per node: the
    ingress replicas of a node share it)."""
    return sorted({str(e["metrics_address"]) for e in ingresses if e.get("metrics_address")})


def metrics_urls(ingresses: list[dict[str, Any]]) -> list[str]:
    return [f"http://{target}/metrics" for target in metrics_targets(ingresses)]


def ingress_entries(app_name: str, timeout_s: float = 5.0) -> list[dict[str, Any]]:
    """Every ingress replica's ``entry`` (where it listens) that answers in time."""
    return [e for e in _broadcast(app_name, "ingress", "entry", timeout_s) if "error" not in e]


def _replica(metadata: dict[str, Any], model: str) -> dict[str, Any]:
    row = {"model": model, **{k: metadata.get(k) for k in ("node", "host", "data_port", "pid")}}
    if "error" in metadata:
        return {**row, "pid": 0, "error": metadata["error"]}
    return {
        **row,
        "in_flight": metadata.get("in_flight"),
        "versions": metadata.get("versions", []),
        "device": metadata.get("device"),
        "gpus": metadata.get("gpus", []),
        "mps": metadata.get("mps", {}),
        "cpu_ops": len(metadata.get("cpu_ops") or []),
        "graphs": metadata.get("graphs"),
        "store": {k: (metadata.get("store") or {}).get(k) for k in STORE_FIELDS},
        "embeddings": metadata.get("embeddings"),  # a split model's version and node cache
    }


def _traffic(ingresses: list[dict[str, Any]]) -> dict[str, Any]:
    recent = [i.get("recent") or {} for i in ingresses]
    return {
        "window_s": max((r.get("window_s", 0) for r in recent), default=0),
        "requests_per_s": round(sum(r.get("requests_per_s", 0) for r in recent), 2),
        "errors": sum(r.get("errors", 0) for r in recent),
        "worst_p99_ms": max((r.get("p99_ms", 0) for r in recent), default=0),
    }


def _nodes(replicas: list[dict[str, Any]]) -> dict[str, Any]:
    nodes: dict[str, Any] = {}
    for replica in replicas:
        state = (replica.get("mps") or {}).get("node")
        if state:
            nodes[state.get("node") or str(replica.get("node"))] = {
                "up": state.get("up"),
                "daemon_pid": state.get("daemon_pid"),
                "restarts": state.get("restarts"),
                "servers": {k: len(v) for k, v in (state.get("servers") or {}).items()},
                "last_error": state.get("last_error"),
                "gpu_faults": state.get("gpu_faults", 0),
                "faults": [_fault(f) for f in state.get("faults") or []],
            }
    return nodes


def _fault(follow: dict[str, Any]) -> dict[str, Any]:
    """A followed GPU fault (mpsserve/node/faults.py) as status shows it."""
    cleared = follow.get("cleared_at")
    return {
        "gpu": follow.get("gpu"),
        "server": follow.get("server"),
        "reporter": follow.get("reporter"),
        "at": follow.get("at"),
        "message": str(follow.get("message"))[:200],
        "clients_hit": len(follow.get("clients") or []),
        "remaining": follow.get("remaining"),
        "other_clients": follow.get("others") or [],
        "cleared_after_s": round(cleared - follow["at"], 1) if cleared else None,
    }


def _models(replicas: list[dict[str, Any]], now: float) -> dict[str, Any]:
    """Per model, from the replicas that answer: who serves which version, the split's age
    (None when they agree) and bound, and the failed versions with the replicas reporting them."""
    answering: dict[str, list[dict[str, Any]]] = {}
    for replica in replicas:
        if "error" not in replica:
            answering.setdefault(replica["model"], []).append(replica)
    return {name: _model(rows, now) for name, rows in sorted(answering.items())}


def _model(rows: list[dict[str, Any]], now: float) -> dict[str, Any]:
    serving: dict[str, int] = {}
    failed: dict[str, dict[str, Any]] = {}
    stores = [row.get("store") or {} for row in rows]
    for row, store in zip(rows, stores, strict=True):
        version = ",".join(row.get("versions") or []) or "-"
        serving[version] = serving.get(version, 0) + 1
        for failed_version, reason in sorted((store.get("failed") or {}).items()):
            entry = failed.setdefault(failed_version, {"reason": reason, "replicas": 0})
            entry["replicas"] += 1
    bounds = [s["converge_within_s"] for s in stores if s.get("converge_within_s") is not None]
    since = [s["serving_since"] for s in stores if s.get("serving_since") is not None]
    split = len(serving) > 1
    embeddings: dict[str, int] = {}  # a split model's embedding versions, replicas on each
    for row in rows:
        if row.get("embeddings"):
            tag = str(row["embeddings"]["version"])
            embeddings[tag] = embeddings.get(tag, 0) + 1
    return {
        "embeddings": dict(sorted(embeddings.items())),
        "serving": dict(sorted(serving.items())),
        "split": split,
        # Since the last version change in any replica: the split is at least that old.
        "split_s": round(now - max(since), 1) if split and since else None,
        "bound_s": max(bounds, default=DEFAULT_CONVERGE_S),
        "failed": failed,
    }


def _versions_text(serving: dict[str, int]) -> str:
    return ", ".join(f"{v} on {n} replica(s)" for v, n in serving.items())


def _version_findings(models: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(problems, notes) about versions: splits past their bound, splits within it, failures."""
    problems: list[str] = []
    notes: list[str] = []
    for name, m in models.items():
        if m["split"]:
            late, text = _split_text(name, m)
            (problems if late else notes).append(text)
        if m["failed"]:
            failed = ", ".join(f"{v} ({f['replicas']} replica(s))" for v, f in m["failed"].items())
            notes.append(f"{name} version(s) failed to load: {failed}")
    return problems, notes


def _split_text(name: str, m: dict[str, Any]) -> tuple[bool, str]:
    """(past its bound, what to say) for a model whose replicas serve different versions."""
    versions, bound, age = _versions_text(m["serving"]), m["bound_s"], m["split_s"]
    if age is None:  # no replica says since when: cannot be shown to be converging
        return True, f"{name} split across versions, age unknown ({versions})"
    if age > bound:
        return True, f"{name} split across versions for {age:g} s, past {bound:g} s ({versions})"
    return False, f"converging: {name} split for {age:g} s of {bound:g} s ({versions})"


def _graph_notes(replicas: list[dict[str, Any]]) -> list[str]:
    on_gpu = [r for r in replicas if r.get("graphs") is not None and r.get("device") == "gpu"]
    off = [r for r in on_gpu if not r["graphs"].get("enabled")]
    return [f"CUDA graphs off in {len(off)} of {len(on_gpu)} replica(s)"] if off else []


def _verdict(report: dict[str, Any]) -> tuple[bool, str]:
    """OK or PROBLEM (the exit status), then notes an operator should see either way."""
    version_problems, notes = _version_findings(report.get("models") or {})
    problems = _health_problems(report) + version_problems
    if len(report["ingresses"]) == 1:
        notes.insert(0, "1 ingress answers: a single point of failure")
    notes += _graph_notes(report["replicas"])
    tail = "".join(f"; {note}" for note in notes)
    if problems:
        return False, "PROBLEM: " + "; ".join(problems) + tail
    mps_on = _mps_replicas(report["replicas"])
    attached = f", {len(mps_on)} attached to MPS" if mps_on else ", MPS off"
    return True, f"OK: {len(report['replicas'])} model replica(s) answer{attached}{tail}"


def _mps_replicas(replicas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [r for r in replicas if (r.get("mps") or {}).get("mode", "off") != "off"]


def _health_problems(report: dict[str, Any]) -> list[str]:
    app = report["applications"][report["app"]]
    problems = []
    if app["status"] != "RUNNING":
        problems.append(f"application is {app['status']}")
    replicas = report["replicas"]
    silent = [r for r in replicas if "error" in r]
    if silent:
        problems.append(f"{len(silent)} replica(s) do not answer on their data port")
    mps_on = _mps_replicas(replicas)
    detached = [r for r in mps_on if not r["mps"].get("attached")]
    if detached:
        problems.append(f"{len(detached)} of {len(mps_on)} MPS replica(s) are not attached")
    down = [n for n, s in report["mps_nodes"].items() if not s.get("up")]
    if down:
        problems.append(f"MPS daemon down on {', '.join(down)}")
    for node, state in report["mps_nodes"].items():
        for f in state.get("faults") or []:
            if f["remaining"] and time.time() - f["at"] > LINGER_S:
                problems.append(
                    f"GPU {f['gpu']} fault on {node}: client(s) {f['remaining']} have not "
                    "exited; the MPS server takes no new client until they do"
                )
    if not report["ingresses"]:
        problems.append("no ingress answers")
    return problems


def render(report: dict[str, Any]) -> str:
    """The one screen."""
    lines = [f"mpsserve status: application {report['app']!r}"]
    for name, app in report["applications"].items():
        deployments = " | ".join(
            f"{dep} {d['status']} {d['replicas']}" for dep, d in app["deployments"].items()
        )
        lines.append(f"  {name}: {app['status']}  ({deployments})")
    lines += _store_line(report)
    if "replicas" not in report:
        return "\n".join([*lines, report["verdict"]])
    traffic = report["traffic"]
    lines.append(
        f"traffic, last {traffic['window_s']:g}s over {len(report['ingresses'])} ingress(es): "
        f"{traffic['requests_per_s']:g} req/s, worst P99 {traffic['worst_p99_ms']:g} ms, "
        f"{traffic['errors']} error(s)"
    )
    if report["ingresses"]:
        urls = ", ".join(report.get("metrics") or []) or "off (ingress.metrics_port: null)"
        lines.append(f"metrics: {urls}")
    for node, state in report["mps_nodes"].items():
        lines.append(
            f"MPS daemon on {node}: {'up' if state['up'] else 'DOWN'}, pid {state['daemon_pid']}, "
            f"restarts {state['restarts']}, servers {state['servers'] or '{}'}"
            + (f", last error: {state['last_error']}" if state.get("last_error") else "")
        )
        lines += [_fault_line(f) for f in state.get("faults") or []][-3:]
    lines.append(f"{'model':<12}{'node':<18}{'gpu':<6}{'pid':<9}{'version':<9}{'graphs':<8}mps")
    for r in sorted(report["replicas"], key=lambda r: (r["model"], str(r["node"]), r["pid"])):
        lines.append(_replica_line(r))
    lines += _model_lines(report.get("models") or {})
    lines.append(report["verdict"])
    return "\n".join(lines)


def _fault_line(f: dict[str, Any]) -> str:
    when = time.strftime("%H:%M:%S", time.localtime(f["at"])) if f.get("at") else "?"
    outcome = (
        f"all {f['clients_hit']} client(s) hit exited after {f['cleared_after_s']:g}s"
        if f.get("cleared_after_s") is not None
        else f"waiting for client(s) {f['remaining']} to exit"
    )
    return (
        f"  GPU {f['gpu']} fault at {when} on server {f['server']} (pid {f['reporter']}: "
        f"{f['message'][:80]}): {outcome}"
    )


def _replica_line(r: dict[str, Any]) -> str:
    if "error" in r:
        mps = f"NO ANSWER ({r['error']})"
        version = gpu = graphs = "?"
    else:
        info = r["mps"]
        mps = (
            "off"
            if info.get("mode") == "off"
            else f"attached, server {info['server']}"
            if info.get("attached")
            else f"NOT ATTACHED ({info.get('detail')})"
        )
        version, gpu = ",".join(r["versions"]) or "-", ",".join(r["gpus"]) or r["device"]
        graphs = _graphs_text(r.get("graphs"))
    node = str(r["node"])[:17]
    return f"{r['model']:<12}{node:<18}{gpu:<6}{r['pid']:<9}{version:<9}{graphs:<8}{mps}"


def _graphs_text(graphs: dict[str, Any] | None) -> str:
    if graphs is None:
        return "-"
    if not graphs.get("enabled"):
        return "off"
    return f"on {graphs.get('graphs', graphs.get('captured', 0))}"


#: Longest failure reason the screen shows (``--json`` has all of it).
REASON_CHARS = 90


def _model_lines(models: dict[str, Any]) -> list[str]:
    lines = []
    for name, m in models.items():
        state = ""
        if m["split"]:
            age = "?" if m["split_s"] is None else f"{m['split_s']:g}"
            late = m["split_s"] is None or m["split_s"] > m["bound_s"]
            state = f": {'SPLIT' if late else 'converging'} for {age} s (bound {m['bound_s']:g} s)"
        lines.append(f"versions of {name}: {_versions_text(m['serving'])}{state}")
        if m.get("embeddings"):
            lines.append(f"  embedding versions: {_versions_text(m['embeddings'])}")
        for version, f in m["failed"].items():
            reason = str(f["reason"])
            if len(reason) > REASON_CHARS:
                reason = reason[: REASON_CHARS - 3] + "..."
            lines.append(f"  failed {version} in {f['replicas']} replica(s): {reason}")
    return lines
