"""The chart's monitoring extras as a real Prometheus stack loads them: the rules pass `promtool check
rules`, each alert fires (and stays quiet) as `promtool test rules` expects, the extra labels
kube-prometheus-stack selects on are set, and the dashboard's panels are well formed and query only
metrics that exist."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.test_chart import ALL_MONITORING
from tests.test_chart import render as chart_render
from voxscale.localcluster.harness import CHART, REPO

ALERT_TESTS = REPO / "tests" / "data" / "alerts.test.yaml"
promtool = pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian's prometheus) is missing")


def render(*args: str) -> list[dict[str, Any]]:
    return chart_render(*ALL_MONITORING, *args)


def rules_file(tmp_path: Path) -> Path:
    rule = next(d for d in render() if d["kind"] == "PrometheusRule")
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump(rule["spec"]))
    return path


def promtool_run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd, timeout=60)


@promtool
def test_the_chart_rules_pass_promtool_check_rules(tmp_path: Path) -> None:
    res = promtool_run("check", "rules", str(rules_file(tmp_path)), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


@promtool
def test_every_alert_fires_and_stays_quiet_as_its_promtool_test_says(tmp_path: Path) -> None:
    rules_file(tmp_path)
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    res = promtool_run("test", "rules", ALERT_TESTS.name, cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    tested = {
        t["alertname"] for case in yaml.safe_load(ALERT_TESTS.read_text())["tests"] for t in case["alert_rule_test"]
    }
    alerts = {r["alert"] for r in yaml.safe_load((tmp_path / "rules.yaml").read_text())["groups"][0]["rules"]}
    assert alerts == tested, f"alerts without a promtool test: {alerts - tested}"


def test_kube_prometheus_stack_release_label_reaches_every_monitoring_object() -> None:
    docs = render("--set", "monitoring.labels.release=kube-prometheus-stack")
    kinds = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
    labelled = {d["kind"] for d in docs if d["metadata"]["labels"].get("release") == "kube-prometheus-stack"}
    assert labelled == kinds


def test_the_dashboard_panels_are_well_formed_and_cover_the_scaling_story() -> None:
    """The fields Grafana needs of every panel (no Grafana here to load it into: checked by shape),
    and the panels a platform team asks for: demand vs capacity, forecast vs actual, advised replicas
    and refused requests."""
    dashboard = json.loads((CHART / "dashboards" / "voxscale.json").read_text())
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        assert {"type", "title", "gridPos", "datasource", "targets"} <= set(panel), panel.get("title")
        assert set(panel["gridPos"]) == {"h", "w", "x", "y"} and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)) and all(t["expr"] for t in panel["targets"]), panel["title"]
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "voxscale_operator_demand_rps",
        "voxscale_operator_replica_capacity_rps",
        "voxscale_operator_forecast_rps",
        "voxscale_operator_forecast_actual_rps",
        "voxscale_operator_advised_replicas",
        'code="429"',
    ):
        assert metric in exprs, metric
