"""`make demo`'s command end to end (the short variant): it runs, explains itself, plots, and cleans up."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from voxscale.localcluster.cluster import state_root


@pytest.mark.cluster
def test_demo_runs_end_to_end_and_leaves_no_process_behind(tmp_path: Path) -> None:
    png = tmp_path / "demo.png"
    name = "pytest-demo"
    res = subprocess.run(
        [sys.executable, "-m", "voxscale.cli", "demo", "--fast", "--cluster-name", name, "--plot", str(png)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = res.stdout
    assert "no model runs here" in out  # it says plainly where the metrics come from
    assert "summary" in out
    assert "->" in out  # at least one scale decision was shown live
    # The slo trigger reaches what the load needs in time, and not much more.
    caught_up = next(line for line in out.splitlines() if "ready capacity caught up" in line)
    assert ": within the decision" in caught_up, caught_up
    peak_line = next(line for line in out.splitlines() if line.strip().startswith("peak replicas"))
    peak, need = (int(w) for w in re.findall(r"peak replicas (\d+); the load needs (\d+)", peak_line)[0])
    assert need <= peak <= need + 1, peak_line
    assert "demand" in out and "capacity" in out and "forecast" in out  # the live table's columns
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert not (state_root() / name).exists()
    leftovers = subprocess.run(
        ["pgrep", "-f", f"{state_root()}/{name}/|{name}.kubeconfig"], capture_output=True, text=True
    )
    assert leftovers.stdout.strip() == "", f"processes left behind: {leftovers.stdout}"
