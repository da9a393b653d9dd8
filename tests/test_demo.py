"""`make demo`'s command end to end (the short variant): it runs, explains itself, plots, and cleans up."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster_reaping import leftovers_of, run_interruptible
from voxscale.localcluster.cluster import state_root

# The real-pods demo on a machine where containerd has never seen the images: copying the 6.2 GB
# inference image in takes 90-165 s, the demo itself ~150 s, a loaded machine more (measured on a
# cold run, README). The images themselves are built by `make test` before pytest starts.
# tests/test_killed_midway.py forces it low to kill the test midway (a marker wins over --timeout).
REAL_PODS_DEMO_TIMEOUT_S = int(os.environ.get("VOXSCALE_REAL_PODS_DEMO_TIMEOUT_S", "1200"))


@pytest.mark.cluster
def test_demo_runs_end_to_end_and_leaves_no_process_behind(
    tmp_path: Path, reap_clusters: Callable[[str], None]
) -> None:
    png = tmp_path / "demo.png"
    name = "pytest-demo"
    reap_clusters(name)
    res = run_interruptible(
        [sys.executable, "-m", "voxscale.cli", "demo", "--fast", "--cluster-name", name, "--plot", str(png)],
        timeout=540,
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


@pytest.mark.cluster
@pytest.mark.timeout(REAL_PODS_DEMO_TIMEOUT_S)
def test_the_real_pods_demo_serves_every_accepted_request_and_leaves_nothing_behind(
    tmp_path: Path, operator_image: str, inference_image: str, reap_clusters: Callable[[str], None]
) -> None:
    """`voxscale demo --real-pods --fast` with the :test images: a real node, the chart's operator
    pod, real servers; it exits 0 only when no accepted request failed, and the plot marks the pods."""
    from voxscale.demo_real import CLUSTER

    reap_clusters(CLUSTER)
    png = tmp_path / "real.png"
    env = {**os.environ, "VOXSCALE_IMAGE_TAG": operator_image.rsplit(":", 1)[1]}
    res = run_interruptible(
        [sys.executable, "-m", "voxscale.cli", "demo", "--real-pods", "--fast", "--plot", str(png)],
        timeout=REAL_PODS_DEMO_TIMEOUT_S + 60,  # pytest-timeout interrupts first; the demo then stops cleanly
        env=env,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = next(line for line in res.stdout.splitlines() if line.startswith("summary:"))
    served = int(re.findall(r"answered 200 by (\d+) real pods", summary)[0])
    assert served >= 2, summary  # the burst was served by a scaled-up pod as well
    assert "accepted requests that failed: 0;" in res.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"
    assert leftovers_of(CLUSTER) == []
