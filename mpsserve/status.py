"""``mpsserve status``: one screen for an operator, read from the running cluster.

Applications and deployments come from Ray Serve; the replicas and ingresses from the
directory (where each registers); each model replica answers a ``metadata`` frame on its
data port (served version, GPU, MPS attach state, its node's MPS daemon as the guardian saw
it); traffic is each ingress's last 60 seconds.
"""

from __future__ import annotations

from typing import Any

from mpsserve.serving.router import call_replica


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
    report: dict[str, Any] = {"app": app_name, "applications": applications}
    if app_name not in applications:
        report["verdict"] = f"PROBLEM: no application {app_name!r} is deployed"
        report["ok"] = False
        return report
    directory = serve.get_deployment_handle("directory", app_name=app_name)
    entries = directory.endpoints.remote().result(timeout_s=timeout_s * 2)
    report["ingresses"] = [e for e in entries if e.get("kind") == "ingress"]
    report["replicas"] = [
        _replica(e, timeout_s) for e in entries if e.get("kind", "model") == "model"
    ]
    report["traffic"] = _traffic(report["ingresses"])
    report["mps_nodes"] = _nodes(report["replicas"])
    report["ok"], report["verdict"] = _verdict(report)
    return report


def _replica(entry: dict[str, Any], timeout_s: float) -> dict[str, Any]:
    row = {k: entry.get(k) for k in ("model", "node", "host", "port", "pid")}
    try:
        metadata = call_replica(entry["host"], entry["port"], {"op": "metadata"}, timeout_s)
        metadata = metadata["metadata"]
    except Exception as exc:  # a replica that does not answer is what the screen is for
        return {**row, "error": f"{type(exc).__name__}: {exc}"}
    return {
        **row,
        "versions": metadata.get("versions", []),
        "device": metadata.get("device"),
        "gpus": metadata.get("gpus", []),
        "mps": metadata.get("mps", {}),
        "cpu_ops": len(metadata.get("cpu_ops") or []),
        "store": {k: metadata.get("store", {}).get(k) for k in ("policy", "swaps", "failed")},
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
            }
    return nodes


def _verdict(report: dict[str, Any]) -> tuple[bool, str]:
    app = report["applications"][report["app"]]
    problems = []
    if app["status"] != "RUNNING":
        problems.append(f"application is {app['status']}")
    replicas = report["replicas"]
    silent = [r for r in replicas if "error" in r]
    if silent:
        problems.append(f"{len(silent)} replica(s) do not answer on their data port")
    mps_on = [r for r in replicas if (r.get("mps") or {}).get("mode", "off") != "off"]
    detached = [r for r in mps_on if not r["mps"].get("attached")]
    if detached:
        problems.append(f"{len(detached)} of {len(mps_on)} MPS replica(s) are not attached")
    down = [n for n, s in report["mps_nodes"].items() if not s.get("up")]
    if down:
        problems.append(f"MPS daemon down on {', '.join(down)}")
    if not report["ingresses"]:
        problems.append("no ingress is registered")
    if problems:
        return False, "PROBLEM: " + "; ".join(problems)
    attached = f", {len(mps_on)} attached to MPS" if mps_on else ", MPS off"
    return True, f"OK: {len(replicas)} model replica(s) answer{attached}"


def render(report: dict[str, Any]) -> str:
    """The one screen."""
    lines = [f"mpsserve status: application {report['app']!r}"]
    for name, app in report["applications"].items():
        deployments = " | ".join(
            f"{dep} {d['status']} {d['replicas']}" for dep, d in app["deployments"].items()
        )
        lines.append(f"  {name}: {app['status']}  ({deployments})")
    if "replicas" not in report:
        return "\n".join([*lines, report["verdict"]])
    traffic = report["traffic"]
    lines.append(
        f"traffic, last {traffic['window_s']:g}s over {len(report['ingresses'])} ingress(es): "
        f"{traffic['requests_per_s']:g} req/s, worst P99 {traffic['worst_p99_ms']:g} ms, "
        f"{traffic['errors']} error(s)"
    )
    for node, state in report["mps_nodes"].items():
        lines.append(
            f"MPS daemon on {node}: {'up' if state['up'] else 'DOWN'}, pid {state['daemon_pid']}, "
            f"restarts {state['restarts']}, servers {state['servers'] or '{}'}"
            + (f", last error: {state['last_error']}" if state.get("last_error") else "")
        )
    lines.append(f"{'model':<12}{'node':<18}{'gpu':<6}{'pid':<9}{'version':<9}mps")
    for r in sorted(report["replicas"], key=lambda r: (r["model"], str(r["node"]), r["pid"])):
        if "error" in r:
            mps = f"NO ANSWER ({r['error']})"
            version = gpu = "?"
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
        lines.append(
            f"{r['model']:<12}{str(r['node'])[:17]:<18}{gpu:<6}{r['pid']:<9}{version:<9}{mps}"
        )
    lines.append(report["verdict"])
    return "\n".join(lines)
