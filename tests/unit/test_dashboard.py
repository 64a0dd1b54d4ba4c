"""The Grafana dashboard and the Prometheus scrape config in deployments/ match the metrics.

Every PromQL expression may name only metrics that mpsserve/metrics.py defines (as Ray exports
them) and Ray Serve's request metrics the replicas record, all of them series the ingress's
metrics port serves. That the expressions run on a real Prometheus scraping that port is
tests/integration/test_metrics_port.py (and test_metrics_export.py for Ray's export).
"""

from __future__ import annotations

import json
import re
import subprocess
from fnmatch import fnmatch

import pytest
import yaml

from mpsserve import metrics
from mpsserve.ingress.metrics_port import wanted
from mpsserve.ops.cluster import discovery_path, state_dir
from tests.observability import PROMETHEUS_YML, find, load_dashboard, panels

#: Ray Serve's request metrics (``metrics.SERVE_*``) as Ray exports them: counters get _total.
SERVE_NAMES = {
    "ray_serve_deployment_request_counter_total",
    "ray_serve_deployment_error_counter_total",
    *metrics.SERVE_LATENCY.exported,
}
RAY_DISCOVERY_FILE = "/tmp/ray/prom_metrics_service_discovery.json"

_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and"}
_KEYWORDS |= {"or", "unless", "offset", "inf", "nan", "le"}
_STRIPPED = (
    r'"(?:[^"\\]|\\.)*"',  # strings (label values, regexes)
    r"\{[^}]*\}",  # label matchers
    r"\[[^\]]*\]",  # ranges and subqueries
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)",  # label lists
)


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (not functions, labels or keywords)."""
    for pattern in _STRIPPED:
        expr = re.sub(pattern, " ", expr)
    tokens = re.finditer(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(?![\w:]|\s*\()", expr)
    return {t.group(1) for t in tokens if t.group(1) not in _KEYWORDS}


def test_the_name_extractor() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (model, le) (rate(ray_x_bucket{model=~"$model",'
        'le!="1"}[$__rate_interval]))) / on(model) group_left ray_y offset 5m > bool 0'
    )
    assert metric_names(expr) == {"ray_x_bucket", "ray_y"}


def test_every_panel_queries_only_defined_metrics() -> None:
    known = metrics.exported_names() | SERVE_NAMES
    # all of them served by the metrics port (its filter keeps the app's Serve series)
    assert all(wanted(name, {"application": "mpsserve"}, "mpsserve") for name in known)
    used: set[str] = set()
    for panel in panels(load_dashboard()):
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        for target in panel["targets"]:
            names = metric_names(target["expr"])
            assert names, f"{panel['title']!r}: no metric in {target['expr']!r}"
            assert names <= known, f"{panel['title']!r}: unknown {sorted(names - known)}"
            used |= names
    # Every metric of the service is on the dashboard (a histogram through its buckets).
    shown = {spec.name for spec in metrics.METRICS if set(spec.exported) & used}
    assert shown == {spec.name for spec in metrics.METRICS}


def test_dashboard_variables_and_layout() -> None:
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41 and dashboard["uid"] == "mpsserve"
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for name in ("model", "node"):
        query = variables[name]["query"]["query"]
        found = re.fullmatch(r"label_values\((\w+), (\w+)\)", query)
        assert found and found.group(1) in metrics.exported_names() and found.group(2) == name
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24


def test_dashboard_loads_as_a_provisioned_file_in_rays_grafana() -> None:
    """Ray's Grafana (``/tmp/ray/session_latest/metrics/grafana``, a file provider over its
    dashboards folder, one Prometheus data source) loads a dashboard JSON as it is: the model
    itself, not an export wrapper, no numeric id, no import-time ``__inputs`` placeholders,
    every data source the ``${datasource}`` variable (Ray's own dashboards do the same)."""
    dashboard = load_dashboard()
    assert "dashboard" not in dashboard and "__inputs" not in dashboard
    assert dashboard.get("id") is None and dashboard["title"] == "mpsserve"
    text = json.dumps(dashboard)
    assert "DS_PROMETHEUS" not in text
    for panel in panels(dashboard):
        assert all(t["datasource"] == panel["datasource"] for t in panel["targets"])
        assert all(t["refId"] for t in panel["targets"])


def test_prometheus_config_reads_the_files_serve_writes() -> None:
    """The shipped config scrapes what `mpsserve serve` lists (its state dir's
    clusters/<app>.prometheus.json, read relative to the config), never Ray's discovery file,
    which lists every Ray cluster of the host."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"mpsserve", "mpsserve-static"}
    files = [f for sd in jobs["mpsserve"]["file_sd_configs"] for f in sd["files"]]
    written = discovery_path("shop").relative_to(state_dir())
    assert files == ["clusters/*.prometheus.json"] and fnmatch(str(written), files[0])
    assert jobs["mpsserve-static"]["static_configs"][0]["targets"] == []
    assert RAY_DISCOVERY_FILE not in json.dumps(config)  # only in a comment, as an option


def test_promtool_accepts_the_config() -> None:
    promtool = find("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make installs it with Prometheus)")
    done = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
