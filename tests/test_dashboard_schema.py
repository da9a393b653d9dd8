"""The chart's Grafana dashboard against Grafana's own dashboard schema (issue 22, item 13).

Grafana itself is not run here (AGPL, and no build of it fits this machine): the check is
hack/dashboard-schema, a small Go program over grafana-foundation-sdk (Apache-2.0), whose types are
generated from Grafana's dashboard schema. It decodes the dashboard strictly - a required field
missing, a field of the wrong type or a field the schema does not know fails - down to each panel's
plugin options and field config and each Prometheus query. The dashboard as the chart ships it (the
ConfigMap Grafana's sidecar loads) is what is checked, and a misspelt field is shown to fail.
"""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.test_chart import ALL_MONITORING, render
from voxscale.localcluster.harness import CHART, REPO

CHECKER = REPO / "hack" / "dashboard-schema"
DASHBOARD_KEY = "voxscale.json"


@pytest.fixture(scope="module")
def checker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The schema check, built once (about a minute cold on two cores, from the Go module proxy)."""
    if shutil.which("go") is None:
        pytest.fail("the Go toolchain ('go') is not on PATH; `make deps` installs it")
    out = tmp_path_factory.mktemp("dashboard-schema") / "dashboard-schema"
    res = subprocess.run(["go", "build", "-o", str(out), "."], cwd=CHECKER, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    return out


def shipped_dashboard() -> dict[str, Any]:
    """The dashboard as the chart renders it into the ConfigMap Grafana's sidecar loads."""
    docs = render(*ALL_MONITORING, "--set", "monitoring.grafanaDashboard.enabled=true")
    (configmap,) = [d for d in docs if d["kind"] == "ConfigMap" and DASHBOARD_KEY in d.get("data", {})]
    board: dict[str, Any] = json.loads(configmap["data"][DASHBOARD_KEY])
    return board


def check(checker: Path, board: dict[str, Any], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "dashboard.json"
    path.write_text(json.dumps(board))
    return subprocess.run([str(checker), str(path)], capture_output=True, text=True, timeout=60)


def test_the_shipped_dashboard_conforms_to_grafanas_dashboard_schema(checker: Path, tmp_path: Path) -> None:
    board = shipped_dashboard()
    assert board == json.loads((CHART / "dashboards" / DASHBOARD_KEY).read_text())
    res = check(checker, board, tmp_path)
    assert res.returncode == 0, res.stderr
    assert f"conforms ({len(board['panels'])} panels)" in res.stdout


@pytest.mark.parametrize(
    ("what", "change", "reported"),
    [
        ("a misspelt panel field", lambda b: b["panels"][0].update(gridpos=b["panels"][0].pop("gridPos")), "gridpos"),
        ("a misspelt query field", lambda b: b["panels"][1]["targets"][0].update(exprr="up"), "exprr"),
        ("a wrong type", lambda b: b.update(schemaVersion="39"), "schemaVersion"),
        ("a required field missing", lambda b: b.pop("annotations"), "annotations"),
        (
            "an unknown field config option",
            lambda b: b["panels"][0]["fieldConfig"]["defaults"].update(custom={"lineWidthh": 1}),
            "lineWidthh",
        ),
    ],
)
def test_the_schema_check_fails_a_dashboard_that_does_not_conform(
    checker: Path, tmp_path: Path, what: str, change: Any, reported: str
) -> None:
    board = copy.deepcopy(shipped_dashboard())
    change(board)
    res = check(checker, board, tmp_path)
    assert res.returncode == 1 and reported in res.stderr, f"{what}: {res.stdout}{res.stderr}"
