"""Smoke run of bench/goodput_bench.py (issue 24, item 5: a bench that cannot rot): both servers (HEAD from
a git archive, and the working tree) start, their capacity is measured, the schedule runs, the figures
come out with their fields. Seconds, not minutes; no timing is asserted."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(300)
def test_goodput_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "goodput.json"
    cmd = [sys.executable, "-m", "bench.goodput_bench", "--seconds", "2", "--recovery", "1"]
    cmd += ["--capacity-seconds", "2", "--json", str(out)]
    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280)
    assert res.returncode == 0, res.stderr[-3000:]
    results = json.loads(out.read_text())
    assert [r["server"] for r in results] == ["baseline HEAD", "working tree"]
    for r in results:
        assert r["capacity_rps"] > 0 and r["timeout_s"] > 0
        assert [w["name"] for w in r["windows"]] == ["overload", "recovery"]
        assert all(
            {"ok", "abandoned", "refused", "other", "goodput_rps", "offered_rps"} <= set(w) for w in r["windows"]
        )
    assert "goodput/s" in res.stdout
