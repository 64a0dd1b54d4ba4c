"""The Grafana dashboard and the Prometheus scrape config in deployments/ match the metrics.

Every PromQL expression may name only metrics that mpsserve/metrics.py defines (as Ray exports
them) and the few of Ray's own metrics listed here. That the expressions run on a real
Prometheus is tests/integration/test_metrics_export.py.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from mpsserve import metrics
from tests.observability import PROMETHEUS_YML, find, load_dashboard, panels

#: Ray's own metrics the dashboard shows on purpose.
RAY_NAMES = {"ray_node_cpu_utilization"}
DISCOVERY_FILE = "/tmp/ray/prom_metrics_service_discovery.json"

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
    known = metrics.exported_names() | RAY_NAMES
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


def test_prometheus_config_names_rays_discovery_file() -> None:
    from ray._private import ray_constants

    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    files = [f for sd in jobs["ray"]["file_sd_configs"] for f in sd["files"]]
    assert files == [DISCOVERY_FILE]
    assert Path(DISCOVERY_FILE).name == ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
    assert jobs["ray-static"]["static_configs"][0]["targets"] == []


def test_promtool_accepts_the_config() -> None:
    promtool = find("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (make installs it with Prometheus)")
    done = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
