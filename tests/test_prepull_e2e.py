"""Image pre-pull on the real node (issue 23 item 4), end to end: nothing faked.

The bench (bench/prepull_bench.py) is the driver, at one trial per mode: a local cluster with a real node,
distribution's registry on 127.0.0.1 that the node's containerd pulls from, Piper's image pushed there, the
operator as a host process with the chart's RBAC, a plain Deployment of the image with a TTSDeployment
attached. Before each trial every layer of the image is gone from the node (checked by chain ID). With
spec.prePull on: the DaemonSet turns Ready (ImagePrePulled=True), the image is in containerd before any
server pod exists, the server pod's image event says it was already present, its pull-and-start phase is
shorter than the cold pull's, and turning pre-pull off deletes the DaemonSet (its condition goes too).

Needs the real node, one per machine: run it under the lock,
    flock /tmp/voxscale-realnode.lock .venv/bin/pytest tests/test_prepull_e2e.py -x -q
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_benches import completed, run_bench
from voxscale.metrics_contract import POD_LABEL_TTSDEPLOYMENT
from voxscale.operator import children

CLUSTER = f"{os.environ.get('VOXSCALE_TEST_CLUSTER', 'pytest')}-prepull"


@pytest.mark.timeout(2400)
def test_pre_pull_puts_the_image_on_the_node_before_the_scale_up(
    piper_image: str, reap_clusters: Callable[[str], None], tmp_path: Path
) -> None:
    reap_clusters(CLUSTER)  # torn down however the test ends
    out = tmp_path / "prepull.json"
    res = run_bench("prepull_bench", "--trials", "1", "--image", piper_image, "--cluster", CLUSTER,
                    "--json", str(out), timeout=2300)  # fmt: skip
    completed(res)
    report = json.loads(out.read_text())
    without, with_ = (next(t for t in report["trials"] if t["prePull"] is mode) for mode in (False, True))
    for t in (without, with_):
        assert t["coldNode"]["layersChecked"] == report["imageLayers"] > 0  # no layer of it on the node
    # Without pre-pull the kubelet pulls the image when the pod is created.
    assert any("Successfully pulled image" in m for m in without["imageEvents"]), without["imageEvents"]
    # With it: the DaemonSet Ready on the node, the image there before any server pod, no pull at scale-up.
    assert with_["daemonSet"] == {"desiredNumberScheduled": 1, "numberReady": 1}
    assert with_["imageOnNodeBeforeScaleUp"] is True and with_["serverPodsBeforeScaleUp"] == 0
    assert all(POD_LABEL_TTSDEPLOYMENT not in labels for labels in with_["prePullPodLabels"])
    assert all(labels[children.PREPULL_LABEL] == "piper" for labels in with_["prePullPodLabels"])
    assert any("already present on machine" in m for m in with_["imageEvents"]), with_["imageEvents"]
    assert not any("Pulling image" in m for m in with_["imageEvents"]), with_["imageEvents"]
    # status.coldStart reports the pull-and-start phase for both; the pulled one is the longer.
    cold, warm = (t["statusColdStart"]["pullAndStartP90Seconds"] for t in (without, with_))
    assert cold > warm, (cold, warm)
