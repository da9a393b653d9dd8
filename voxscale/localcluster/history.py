"""Backfill Prometheus with arrival history, as a cluster that has run for days would have it.

The forecast floor learns from the `voxscale_requests_received_total` counters Prometheus kept over
the last days. A fresh local cluster has none, so tests and the demo write some: OpenMetrics text of
the counters, turned into TSDB blocks by `promtool tsdb create-blocks-from openmetrics` (it ships
with Debian's prometheus) in Prometheus' own data directory, then Prometheus restarted to load them.
"""

from __future__ import annotations

import datetime as dt
import shutil
import subprocess
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path

from voxscale import metrics_contract as mc
from voxscale.localcluster.cluster import LocalCluster

STEP_SECONDS = 60


def openmetrics(
    pods: Sequence[tuple[str, str]], start: dt.datetime, end: dt.datetime, rps: Callable[[dt.datetime], float]
) -> str:
    """The received-requests counter of each (namespace, pod), one sample a minute, the total arrival
    rate `rps(t)` spread evenly over the pods."""
    family = mc.REQUESTS_RECEIVED.name.removesuffix("_total")
    lines = [f"# HELP {family} {mc.REQUESTS_RECEIVED.help}", f"# TYPE {family} counter"]
    totals = [0.0] * len(pods)
    t = start
    while t < end:
        share = rps(t) * STEP_SECONDS / len(pods)
        for i, (ns, pod) in enumerate(pods):
            totals[i] += share
            lines.append(f'{family}_total{{namespace="{ns}",pod="{pod}"}} {totals[i]:.3f} {t.timestamp():.0f}')
        t += dt.timedelta(seconds=STEP_SECONDS)
    lines.append("# EOF")
    return "\n".join(lines) + "\n"


def backfill(cluster: LocalCluster, text: str) -> None:
    """Write `text` (OpenMetrics) into the cluster's Prometheus as blocks, and reload it."""
    st = cluster.state
    assert st is not None, "the cluster is not up"
    promtool = shutil.which("promtool")
    if promtool is None:
        raise RuntimeError("promtool is not installed: `apt-get install prometheus` (make test does this)")
    data = st.dir / "prometheus" / "data"
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "history.om"
        source.write_text(text)
        subprocess.run(
            [promtool, "tsdb", "create-blocks-from", "openmetrics", "--max-block-duration=24h", str(source), str(data)],
            check=True,
            capture_output=True,
            text=True,
        )
    # Prometheus loads new blocks at its next compaction cycle; a restart loads them now.
    cluster.stop_process("prometheus")
    cluster.start_process("prometheus")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{st.prometheus_url}/-/ready", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("Prometheus did not come back within 60 s after the backfill")


def daily_peak(start_of_peak: dt.datetime, base: float, peak: float, minutes: float) -> Callable[[dt.datetime], float]:
    """An arrival rate of `base`, and `peak` for `minutes` from the time of day of `start_of_peak`."""
    offset = (start_of_peak.hour * 60 + start_of_peak.minute) % 1440

    def rate(t: dt.datetime) -> float:
        into = (t.hour * 60 + t.minute - offset) % 1440
        return peak if into < minutes else base

    return rate
