"""``mpsserve`` command line: serve, deploy, doctor, status, serve-config, demo-model,
audit-ops, embeddings (``_parser`` holds each command's help).

Commands that need Ray import it lazily, so ``demo-model`` and ``--help`` stay fast.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from mpsserve import __version__
from mpsserve.config import ServiceConfig, load_config
from mpsserve.errors import ConfigError
from mpsserve.ops.cluster import (
    ADDRESS_HELP,
    DEFAULT_APP,
    ClusterRecord,
    Target,
    Watchdog,
    cluster_line,
    discovery_path,
    join,
    read_record,
    remove_record,
    resolve,
    state_dir,
    write_discovery,
    write_record,
)
from mpsserve.ops.deploy import (
    Cluster,
    deploy,
    deploy_to,
    load_service,
    run_command,
    start_ray,
    use_cluster_token,
)
from mpsserve.ops.localray import LocalHead, job_server_problem, start_local, token_source

logger = logging.getLogger("mpsserve")
DEFAULT_CONFIG = "deployments/local.yaml"
REQUEST_DIR = Path(".mpsserve")


DESCRIPTION = (
    "Serve recommendation models on GPUs shared by many processes through CUDA MPS, on Ray "
    "Serve. Each command reads a service YAML (--config); see README.md for its fields."
)
EPILOG = (
    "Run `mpsserve COMMAND --help` for a command's flags. Exit codes: 0 ok; 1 a problem the "
    "command found (doctor, status, audit-ops) or a failed deployment; 2 a bad config or "
    "argument, or a model that cannot load."
)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mpsserve", description=DESCRIPTION, epilog=EPILOG)
    parser.add_argument(
        "--version", action="version", version=f"mpsserve {__version__}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    config_help = "service YAML (default: %(default)s)"

    serve = sub.add_parser("serve", help="start a local Ray (or join one) and serve until Ctrl-C")
    serve.add_argument("--config", default=DEFAULT_CONFIG, help=config_help)
    serve.add_argument(
        "--rows", type=int, default=2000, help="rows in the printed request (default: %(default)s)"
    )

    deploy = sub.add_parser("deploy", help="deploy to a running Ray cluster and return")
    deploy.add_argument(
        "--config",
        default=DEFAULT_CONFIG,
        help="service YAML, or a Serve config file from it (default: %(default)s)",
    )
    deploy.add_argument("--address", default=None, help=ADDRESS_HELP)

    doctor = sub.add_parser(
        "doctor",
        help="can MPS work on this node? checks and a verdict (exit 1: it cannot, where needed)",
        description="Checks the GPUs, the MPS binaries, pipe directory and daemon against the "
        "config's mps.mode. Exit 1 only when MPS is needed and cannot work: mode 'on', or "
        "'auto' on a node with GPUs; mode 'off', or 'auto' on a node without GPUs (CPU "
        "replicas), reports the facts and exits 0. Read-only.",
    )
    doctor.add_argument("--config", default=DEFAULT_CONFIG, help=config_help)
    doctor.add_argument("--json", action="store_true", help="print the report as JSON")

    status = sub.add_parser(
        "status",
        help="one screen: replicas, GPUs, MPS attach, versions, traffic (exit 1: a problem)",
    )
    status.add_argument("--config", default=None, help="service YAML (its app name, ray.address)")
    status.add_argument("--app", default=None, help=f"app name (default: config's, {DEFAULT_APP})")
    status.add_argument("--address", default=None, help=ADDRESS_HELP)
    status.add_argument("--json", action="store_true", help="print the report as JSON")

    serve_file = sub.add_parser(
        "serve-config", help="print the Serve config file (serve deploy FILE) for a service YAML"
    )
    serve_file.add_argument("--config", default=DEFAULT_CONFIG, help=config_help)
    serve_file.add_argument(
        "--cluster-gpus",
        type=int,
        default=None,
        help="the target cluster's GPUs; with --cluster-cpus, each model's settings go in its "
        "deployment's overrides, so a redeploy that changes one model restarts only its "
        "replicas (default: read on the cluster when the app is built; any change but a "
        "version policy then restarts every replica)",
    )
    serve_file.add_argument(
        "--cluster-cpus", type=float, default=None, help="the target cluster's CPUs (see above)"
    )

    demo = sub.add_parser("demo-model", help="write the demo recommender as DIR/<version>/")
    demo.add_argument(
        "--out", required=True, type=Path, metavar="DIR", help="model store directory (required)"
    )
    demo.add_argument(
        "--format",
        choices=["tensorflow", "torch"],
        default="tensorflow",
        help="a SavedModel (tensorflow) or a torch.export program (torch) (default: %(default)s)",
    )
    demo.add_argument(
        "--version",
        type=int,
        default=1,
        help="version number, the subdirectory of DIR written (default: %(default)s)",
    )
    demo.add_argument(
        "--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)"
    )
    demo.add_argument(
        "--table-rows",
        type=int,
        default=100_000,
        help="rows per embedding table (default: %(default)s)",
    )
    demo.add_argument(
        "--if-missing", action="store_true", help="do nothing if DIR already holds a version"
    )
    demo.add_argument(
        "--warmup-requests",
        type=_warmup_requests,
        default=0,
        metavar="N",
        help="also write N requests (1-1000) to the version's TF Serving warm-up file, "
        "assets.extra/tf_serving_warmup_requests (default: none)",
    )
    demo.add_argument(
        "--split",
        metavar="TAG",
        default=None,
        help="write the split build: the DNN alone and an embeddings.json naming embedding "
        "version TAG, whose tables `mpsserve embeddings publish --model-dir DIR/<version> "
        "--version TAG` puts in the store (same scores as the monolithic build; "
        "docs/embeddings.md) (default: monolithic)",
    )

    audit = sub.add_parser(
        "audit-ops",
        help="list a SavedModel's ops that have no GPU kernel (they fall back to the CPU)",
        description="Lists the ops of the signature's graph, functions included, that have no "
        "GPU kernel registered for their dtypes in this TensorFlow, and, where a GPU is "
        "visible, what TensorFlow placed on the CPU for one synthetic request. Exit code: 0 "
        "when no op falls back, 1 when some do, 2 when the model or a library cannot load.",
    )
    audit.add_argument("model_dir", type=Path, metavar="MODEL_DIR", help="a SavedModel dir")
    audit.add_argument(
        "--signature",
        default="serving_default",
        help="signature to audit (default: %(default)s)",
    )
    audit.add_argument("--json", action="store_true", help="print the report as JSON")
    audit.add_argument(
        "--custom-op-library",
        action="append",
        default=[],
        metavar="PATH",
        help="load this op library (.so) before the model; repeat for several (default: none)",
    )
    _embeddings_parser(sub, config_help)
    return parser


def _embeddings_parser(sub: Any, config_help: str) -> None:
    """``mpsserve embeddings ACTION``: the embedding store of the config's ``embeddings``."""
    group = sub.add_parser(
        "embeddings",
        help="publish, list, pin and delete embedding versions in the store (Redis Cluster)",
        description="Manage the embedding versions in the store the config's embeddings "
        "section names (docs/embeddings.md). Exit 2 when the store cannot be reached or "
        "refuses (a pinned version, a version that exists).",
    )
    actions = group.add_subparsers(
        dest="action", required=True, metavar="ACTION", help="what to do with the store"
    )
    publish = actions.add_parser(
        "publish",
        help="write a model's tables into the store under a version tag (bulk, pipelined)",
        description="Rows are written in pipelined batches with progress lines; the version "
        "is marked complete only after every row is in, so a failed publish is never used. "
        "Running it again for an incomplete version resumes (rewrites) it.",
    )
    publish.add_argument(
        "--model-dir",
        required=True,
        type=Path,
        metavar="PATH",
        help="an .npz of tables, a directory holding embeddings.npz, or a demo model "
        "version directory (its tables are made again from demo.json) (required)",
    )
    publish.add_argument(
        "--version",
        required=True,
        metavar="TAG",
        help="version tag, e.g. 2026-12-02T0100 (required)",
    )
    publish.add_argument(
        "--buckets",
        type=int,
        default=None,
        metavar="N",
        help="hashes per table (default: one per 8192 rows, at least 256)",
    )
    publish.add_argument(
        "--base",
        metavar="TAG",
        default=None,
        help="publish a delta of complete version TAG: the tables hold only changed rows "
        "(an .npz with <table>__ids), lookups read the rest from TAG; replicas serving TAG "
        "(or a delta of it) move to it without a restart (default: a full version)",
    )
    publish.add_argument("--pin", action="store_true", help="pin the version once complete")
    listing = actions.add_parser("list", help="the versions, their tables, state and pins")
    listing.add_argument("--json", action="store_true", help="print the versions as JSON")
    delete = actions.add_parser("delete", help="remove a version's rows and record")
    delete.add_argument("--version", required=True, metavar="TAG", help="version to delete")
    delete.add_argument(
        "--force", action="store_true", help="delete it even if pinned or served now"
    )
    collect = actions.add_parser(
        "gc",
        help="delete old versions no replica serves: all but the --keep newest, less the "
        "pinned, the leased (served now) and the bases they need",
    )
    collect.add_argument(
        "--keep",
        type=_count,
        default=2,
        metavar="N",
        help="complete versions kept whatever their use, newest first (default: %(default)s)",
    )
    collect.add_argument(
        "--dry-run", action="store_true", help="print what would be deleted, delete nothing"
    )
    for name, text in (("pin", "mark a version in use"), ("unpin", "unmark a version")):
        action = actions.add_parser(name, help=f"{text} (delete refuses pinned versions)")
        action.add_argument("--version", required=True, metavar="TAG", help="version tag")
    for action in actions.choices.values():
        action.add_argument("--config", default=DEFAULT_CONFIG, help=config_help)


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def _warmup_requests(text: str) -> int:
    """``--warmup-requests``: 0..1000, TF Serving's most records in a warm-up file."""
    if not text.isdigit() or int(text) > 1000:
        raise argparse.ArgumentTypeError(f"{text!r} is not 0..1000 (TF Serving's limit)")
    return int(text)


def cmd_demo_model(args: argparse.Namespace) -> int:
    from mpsserve.ops.demo import DemoSpec, write_demo_model

    existing = [p for p in args.out.glob("*") if p.name.isdigit()] if args.out.exists() else []
    if args.if_missing and existing:
        print(f"{args.out} already holds version(s) {sorted(p.name for p in existing)}; kept")
        return 0
    started = time.monotonic()
    spec = DemoSpec(table_rows=args.table_rows)
    path = write_demo_model(
        args.out, args.format, args.version, args.seed, spec, args.warmup_requests, args.split
    )
    kind = f"split demo model (embedding version {args.split})" if args.split else "demo model"
    print(f"wrote {args.format} {kind} to {path} in {time.monotonic() - started:.1f}s")
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from mpsserve.node.doctor import diagnose

    report = diagnose(load_config(args.config, check_files=False))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        for check in report.checks:
            print(f"  [{check.status:>4}] {check.name}: {check.detail}")
        print(report.verdict)
    return 0 if report.ok else 1


def cmd_embeddings(args: argparse.Namespace) -> int:
    from mpsserve.ops import embeddings

    store = embeddings.store_config(load_config(args.config), args.config)
    if args.action == "publish":
        embeddings.publish(store, args.model_dir, args.version, args.buckets, args.pin, args.base)
    elif args.action == "list":
        embeddings.list_versions(store, args.json)
    elif args.action == "delete":
        embeddings.delete(store, args.version, args.force)
    elif args.action == "gc":
        embeddings.collect(store, args.keep, args.dry_run)
    else:
        embeddings.pin(store, args.version, args.action == "pin")
    return 0


def cmd_audit_ops(args: argparse.Namespace) -> int:
    from mpsserve.ops.audit import audit_saved_model  # imports TensorFlow

    report = audit_saved_model(args.model_dir, args.signature, args.custom_op_library)
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.format_table())
    return 1 if report.falls_back else 0


def _write_request(config: ServiceConfig, model: str, rows: int) -> Path:
    """A JSON request of ``rows`` rows built from the served model's signature."""
    from ray import serve

    from mpsserve.model.features import synthetic_inputs
    from mpsserve.model.runtime.base import Signature
    from mpsserve.protocol.kserve import encode_json_request

    handle = serve.get_deployment_handle(f"model-{model}", app_name=config.ray.app_name)
    metadata: dict[str, Any] = handle.metadata.remote().result()
    inputs = synthetic_inputs(Signature.from_dict(metadata), rows)
    REQUEST_DIR.mkdir(exist_ok=True)
    path = REQUEST_DIR / f"request-{model}.json"
    path.write_bytes(encode_json_request(inputs))
    return path


def _curl_flags(config: ServiceConfig) -> tuple[str, str]:
    """The banner's curl flags for auth and TLS, and a note on what to put in them."""
    auth, tls = config.ingress.auth, config.ingress.tls
    flags, notes = [], []
    if auth is not None:
        flags.append('-H "Authorization: Bearer $TOKEN"')
        notes.append(f"TOKEN: a token of {auth.token_file or '$' + str(auth.token_env)}")
    if tls is not None:
        flags.append("--cacert CA.pem")
        notes.append("CA.pem: the CA of the server's certificate")
        if tls.client_ca_file is not None:
            flags.append("--cert client.pem --key client.key")
            notes.append(f"client.pem: a certificate signed by {tls.client_ca_file}")
    note = f"  ({'; '.join(notes)})\n" if notes else ""
    return "".join(f" {flag}" for flag in flags), note


def _print_endpoints(
    config: ServiceConfig, request: Path, rows: int, cluster: Cluster, record: Path, ray: str
) -> None:
    from mpsserve.ingress.auth import describe

    port, model = config.ingress.http_port, config.models[0].name
    scheme = "https" if config.ingress.tls else "http"
    flags, note = _curl_flags(config)
    base = f"{scheme}://127.0.0.1:{port}"
    show = (
        "import json,sys; o=json.load(sys.stdin)['outputs'][0]; "
        "print(o['name'], o['shape'], o['data'][:5])"
    )
    print(
        f"\n{'=' * 78}\nmpsserve is up.\n"
        f"  HTTP (KServe v2): {base}/v2/models/{model}/infer\n"
        f"  gRPC (KServe v2): 127.0.0.1:{config.ingress.grpc_port} inference.GRPCInferenceService\n"
        f"  TF-Serving REST:  {base}/v1/models/{model}:predict\n"
        f"  health:           {base}/v2/health/ready\n"
        f"  model metadata:   {base}/v2/models/{model}\n"
        f"  public ports:     {describe(config.ingress.auth, config.ingress.tls)}\n"
        f"                    (ingress.auth, ingress.tls; see docs/security.md)\n"
        f"{_metrics_line(config)}"
        f"{ray}"
        f"  recorded in:      {record}\n"
        f"                    (mpsserve status / deploy --config FILE find this cluster there)\n\n"
        f"Try it: a {rows}-row request written from the model's signature to {request}:\n"
        f"  curl -s -H 'Content-Type: application/json'{flags} --data @{request} \\\n"
        f'    {base}/v2/models/{model}/infer | python3 -c "{show}"\n{note}\n'
        f"Ctrl-C stops the service and the local Ray.\n{'=' * 78}",
        flush=True,
    )


def _ray_lines(cluster: Cluster, head: LocalHead | None, config_path: str) -> str:
    """The banner's Ray part: the dashboard with how to log in, the cluster, and Ray's own
    CLI against it, written so that they work as printed (token auth included)."""
    session = Path(cluster.session_dir).name
    pad = " " * 20
    if head is None:
        return (
            f"  Ray dashboard:    {cluster.dashboard}\n"
            f"  Ray address:      {cluster.address}  (session {session}, joined: ray.address)\n"
        )
    if not head.dashboard:
        return (
            "  Ray dashboard:    off (ray.dashboard: false): no job server, no `serve status`\n"
            f"  Ray address:      {cluster.address}  (session {session})\n"
        )
    url = head.dashboard_url
    if head.auth == "token":
        login = (
            f"{pad}token auth on: paste the token of {token_source()} when it asks\n"
            f"{pad}(`{_command('ray')} get-auth-token` prints it)\n"
        )
        env = "RAY_AUTH_MODE=token "
    else:
        login = f"{pad}token auth off (RAY_AUTH_MODE=disabled): anyone reaching it runs code\n"
        env = ""
    problem = job_server_problem(head)
    jobs = "ready" if problem is None else f"NOT AVAILABLE: {problem}"
    config = Path(config_path).resolve()
    return (
        f"  Ray dashboard:    {url}\n{login}"
        f"  Ray address:      {cluster.address}  (session {session})\n"
        f"  Ray job server:   {jobs}\n"
        f"  Ray CLI:          {env}{_command('serve')} status --address {url}\n"
        f"{pad}{env}{_command('ray')} job submit --address {url} \\\n"
        f"{pad}  -- python -m mpsserve.ops.redeploy --config {config}\n"
    )


def _command(name: str) -> str:
    """``name`` where PATH finds this environment's, else its full path."""
    mine = Path(sys.executable).with_name(name)
    found = shutil.which(name)
    return name if found and Path(found).resolve() == mine.resolve() else str(mine)


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    app = config.ray.app_name
    joining = config.ray.address
    head: LocalHead | None = None
    try:
        if joining:
            target = Target(joining, f"ray.address of {args.config}", app)
        else:
            head = _start_local(config, args.config)
            target = Target(head.address, "the local Ray this command started", app)
        cluster = start_ray(config, target)
        record = _record_cluster(config, cluster, args.config, head)
        deploy_to(config, cluster)
        _publish_metrics(config)
        request = _write_request(config, config.models[0].name, args.rows)
        ray = _ray_lines(cluster, head, args.config)
        _print_endpoints(config, request, args.rows, cluster, record, ray)
        _wait_for_signal()
        print("\nstopping ...", flush=True)
    finally:
        remove_record(app, os.getpid())
        _stop_ray(head)
        _stop_mps(config)
        _sweep_node_cache(config)
    print("stopped.")
    return 0


def _start_local(config: ServiceConfig, config_path: str) -> LocalHead:
    """``mpsserve serve``'s own Ray: ``ray start --head`` on the ``ray:`` section's ports."""
    log = state_dir() / "logs" / f"ray-start-{config.ray.app_name}.log"
    return start_local(config.ray, config_path, log)


def _stop_ray(head: LocalHead | None) -> None:
    """Serve and this driver, then the local head (only its processes) if we started one."""
    if "ray" in sys.modules:
        import ray
        from ray import serve

        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()
    if head is not None:
        head.stop()


def _record_cluster(
    config: ServiceConfig, cluster: Cluster, config_path: str, head: LocalHead | None
) -> Path:
    """Where this serve's cluster is, for ``status`` and ``deploy`` (removed when it stops)."""
    record = ClusterRecord(
        app_name=config.ray.app_name,
        address=cluster.address,
        session_dir=cluster.session_dir,
        dashboard_url=head.dashboard_url if head is not None else cluster.dashboard,
        config_path=str(Path(config_path).resolve()),
        pid=os.getpid(),
        started=time.time(),
        ray_ports=dict(head.ports) if head is not None else {},
        ray_auth_mode=head.auth if head is not None else "",
    )
    return write_record(record)


def _publish_metrics(config: ServiceConfig) -> None:
    """Every node's ingress metrics port, as the ingresses say, into the app's Prometheus
    targets file and its cluster record (status and the banner read them there)."""
    if config.ingress.metrics_port is None:
        return
    from dataclasses import replace

    from mpsserve.ops.status import ingress_entries, metrics_targets

    app = config.ray.app_name
    targets = metrics_targets(ingress_entries(app))
    if not targets:
        print("no ingress said where its metrics port is; no Prometheus targets written")
        return
    write_discovery(app, targets)
    record = read_record(app)
    if record is not None and record.pid == os.getpid():
        write_record(replace(record, metrics_url=f"http://{targets[0]}/metrics"))


def _metrics_line(config: ServiceConfig) -> str:
    """The banner's metrics line: the URL Prometheus scrapes, and its targets file."""
    if config.ingress.metrics_port is None:
        return "  metrics:          off (ingress.metrics_port: null)\n"
    record = read_record(config.ray.app_name)
    url = record.metrics_url if record and record.metrics_url else "(no ingress answered)"
    return (
        f"  metrics:          {url}  (Prometheus text format)\n"
        f"                    Prometheus targets: {discovery_path(config.ray.app_name)}\n"
    )


def _sweep_node_cache(config: ServiceConfig) -> None:
    """The embedding node cache's files no process holds any more (replicas that Ray ended
    without their shutdown), so that a stopped service leaves nothing in /dev/shm."""
    if config.embeddings is None:
        return
    from mpsserve.embeddings.lookup import node_cache_dir
    from mpsserve.embeddings.node_cache import sweep

    directory = node_cache_dir(config.embeddings)
    try:
        removed = sweep(directory) if directory.exists() else []
    except OSError as exc:
        print(f"cannot sweep the embedding node cache {directory}: {exc}", flush=True)
        return
    if removed:
        print(f"removed {len(removed)} embedding node cache file(s) from {directory}", flush=True)


def _stop_mps(config: ServiceConfig) -> None:
    from mpsserve.node.hook import stop_daemon_if_ours

    if config.mps.mode != "off" and stop_daemon_if_ours(config.mps):
        print(f"stopped the MPS control daemon on {config.mps.pipe_dir}", flush=True)


def cmd_serve_config(args: argparse.Namespace) -> int:
    import yaml

    from mpsserve.serving.app import serve_config

    if (args.cluster_gpus is None) != (args.cluster_cpus is None):
        raise ConfigError("give both --cluster-gpus and --cluster-cpus, or neither")
    config = load_config(args.config, check_files=False)  # for other machines
    body = serve_config(config, args.cluster_gpus, args.cluster_cpus)
    flags = f"--config {args.config}"
    if args.cluster_gpus is not None:
        flags += f" --cluster-gpus {args.cluster_gpus} --cluster-cpus {args.cluster_cpus:g}"
    print(f"# Serve config generated by `mpsserve serve-config {flags}`")
    print(yaml.safe_dump(body, sort_keys=False), end="")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Read-only: needs no config file; ``--config`` only names the app and its address."""
    config = load_service(args.config) if args.config else None
    app = args.app or (config.ray.app_name if config else DEFAULT_APP)
    address = config.ray.address if config else None
    target = resolve(app, args.address, address, args.config)
    use_cluster_token()
    from mpsserve.ops.status import gather, render, with_store

    with Watchdog("status") as watchdog:
        context = join(target, watchdog=watchdog)
        line = cluster_line(target, context.address_info)
        print(line, file=sys.stderr if args.json else sys.stdout, flush=True)
        report = with_store(gather(app), config.embeddings if config else None)
        report["cluster"] = line
    print(json.dumps(report, indent=2, default=str) if args.json else render(report))
    return 0 if report["ok"] else 1


def cmd_deploy(args: argparse.Namespace) -> int:
    with Watchdog("deploy") as watchdog:
        deploy(args.config, args.address, watchdog)
    return 0


COMMANDS = {
    "serve": cmd_serve,
    "deploy": cmd_deploy,
    "doctor": cmd_doctor,
    "demo-model": cmd_demo_model,
    "serve-config": cmd_serve_config,
    "status": cmd_status,
    "audit-ops": cmd_audit_ops,
    "embeddings": cmd_embeddings,
}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return run_command(args.command, lambda: COMMANDS[args.command](args))


if __name__ == "__main__":
    sys.exit(main())
