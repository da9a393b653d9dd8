"""Every bench in bench/ runs at its smallest size, so a change that breaks one fails here.

Each bench runs as `python -m bench.<name>`, the way its docstring says, with the flags that make it
smallest, and writes its machine-readable report (JSON) to a temporary folder, never to
bench/results/. The tests assert that it completed and that its report has every field, with counts
above zero and ratios finite; never a timing (these runs are seconds long on shared cores: their
figures mean nothing). The benches that need Kubernetes run on a real local control plane: the operator
bench on the test session's cluster (the `cluster` fixture), the fault bench on its own dedicated
cluster (it stops the API server and Prometheus), as it always does.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cluster_reaping import run_interruptible
from voxscale.localcluster.cluster import LocalCluster

REPO = Path(__file__).resolve().parents[1]


def run_bench(name: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """`python -m bench.<name> ARGS` from the repository root (bench/ and tests/ are not installed)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    return run_interruptible([sys.executable, "-m", f"bench.{name}", *args], timeout=timeout, env=env)


def completed(res: subprocess.CompletedProcess[str], codes: tuple[int, ...] = (0,)) -> None:
    why = f"exit {res.returncode}\nstdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-5000:]}"
    assert res.returncode in codes, why
    assert "Traceback" not in res.stderr, res.stderr[-5000:]


def positive(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


# Benches without a smoke run yet, and why: each is a gap, to be closed by giving it one here.
NOT_YET: dict[str, str] = {}  # bench -> why it has no smoke run yet (none today)


def test_every_bench_has_a_smoke_run() -> None:
    """A bench added to bench/ without a smoke run in tests/ fails, so none can rot unseen (here, or
    beside the tests of what it measures, as test_proxy.py runs bench.proxy_bench)."""
    benches = {p.stem for p in (REPO / "bench").glob("*.py")} - {"__init__"}
    sources = "\n".join(p.read_text() for p in Path(__file__).parent.glob("test_*.py"))
    smoked = set(re.findall(r'run_bench\(\s*"(\w+)"|"bench\.(\w+)"', sources))
    missing = sorted(benches - {name for pair in smoked for name in pair if name} - set(NOT_YET))
    assert not missing, f"bench/ modules with no smoke run in tests/: {missing}"


# ------------------------------------------------------------------------------------------ sim_bench
def test_sim_bench_smoke(tmp_path: Path) -> None:
    """Every scenario, each with its own manifest and minimal.yaml, one seed, minutes of simulated
    time, two worker processes (the --jobs path)."""
    from voxscale.simulator import traces

    out = tmp_path / "sim-bench.json"
    res = run_bench("sim_bench", "--seeds", "1", "--days", "0.05", "--jobs", "2", "--out", str(out), timeout=300)
    completed(res)
    assert res.stdout.startswith("| scenario | manifest |"), res.stdout[:500]
    doc = json.loads(out.read_text())
    expected = {(s, m) for s, own in traces.SCENARIO_MANIFESTS.items() for m in (own, "minimal.yaml")}
    assert {(e["scenario"], e["manifest"]) for e in doc["summary"]} == expected
    assert len(doc["cases"]) == len(expected)
    for case in doc["cases"]:
        assert set(case["runs"]) == {"voxscale", "static_peak", "keda", "oracle", "kpa"}
        for summary in case["runs"].values():
            assert positive(summary["gpu_hours"]), case
            assert 0 <= summary["within_slo_percent"] <= 100, case
    for entry in doc["summary"]:
        assert entry["seeds"] == 1 and positive(entry["hours"])
        for role in ("voxscale", "static_peak", "keda", "oracle", "kpa"):
            assert positive(entry[f"{role}_gpu_hours"]), entry
        assert positive(entry["voxscale_over_keda_gpu_hours"]), entry
        assert positive(entry["voxscale_over_oracle_gpu_hours"]), entry


# ------------------------------------------------------------------------------------------ generalize
def test_generalize_smoke(tmp_path: Path) -> None:
    """Seven pairs (every trace kind, six manifest kinds) of 0.05 days on two worker processes: the
    report, the pass/fail lines of issue 21 and every figure of the JSON (not whether they pass)."""
    out = tmp_path / "generalize.json"
    res = run_bench("generalize", "--quick", "--jobs", "2", "--out", str(out), timeout=300)
    completed(res)
    assert res.stdout.startswith("# Generalization bench: 7 pairs"), res.stdout[:500]
    assert len(re.findall(r"^- (PASS|FAIL) \[(keda|kpa)\]", res.stdout, re.M)) == 9, res.stdout
    doc = json.loads(out.read_text())
    assert doc["pairs"] == len(doc["rows"]) == 7 and positive(doc["cpu_seconds_per_simulated_day"])
    assert {r["trace_kind"] for r in doc["rows"]} == {
        "on-off",
        "diurnal",
        "flash-crowd",
        "slow-ramp",
        "mix-shift",
        "outages",
        "weekly",
    }
    for row in doc["rows"]:
        assert set(row["runs"]) == {"voxscale", "keda", "kpa", "oracle"}, row["index"]
        for summary in row["runs"].values():
            assert positive(summary["gpu_hours"]) and 0 <= summary["within_slo_percent"] <= 100, row["index"]
            assert summary["reversals"] >= 0 and finite(summary["reversals_per_day"]), row["index"]
    for peer in ("keda", "kpa"):
        dist = doc["distributions"][peer]
        assert 0 <= dist["slo_win_rate"] <= 1 and 0 <= dist["gpu_win_rate"] <= 1, dist
        assert all(finite(v) for v in dist["gpu_hours_ratio"].values()), dist
        assert all(isinstance(c["passed"], bool) for c in doc["checks"][peer]), doc["checks"]
    assert all(p["failed"] for p in doc["losing"]), doc["losing"]


# ------------------------------------------------------------------------------------------ forecast_bench
def test_forecast_bench_smoke(tmp_path: Path) -> None:
    """Every trace, timezone and method over the first minutes of the second day (--days 1.01)."""
    out = tmp_path / "forecast.json"
    res = run_bench("forecast_bench", "--days", "1.01", "--json", str(out), timeout=300)
    completed(res)
    doc = json.loads(out.read_text())
    assert positive(doc["lookahead_seconds"])
    methods: dict[tuple[str, str], set[str]] = {}
    for r in doc["results"]:
        methods.setdefault((r["trace"], r["timezone"]), set()).add(r["method"])
    assert len({trace for trace, _ in methods}) >= 4, methods  # bench.forecast_bench.CASES
    assert all((trace, "UTC") in methods for trace, _ in methods), methods  # each trace in UTC too
    every = methods[next(iter(methods))]
    assert any("(default)" in m for m in every) and all(m == every for m in methods.values()), methods
    expected = [(k, m) for k in methods for m in every]
    assert len(doc["results"]) == len(expected)
    for r in doc["results"]:
        assert r["forecasts"] > 0, r
        assert finite(r["mape_median_percent"]) and r["mape_median_percent"] >= 0, r
        assert 0 <= r["short_by_10pct_percent"] <= 100, r
        assert finite(r["mean_overshoot_percent"]) and r["mean_overshoot_percent"] >= 0, r
    assert len([ln for ln in res.stdout.splitlines() if ln.startswith("| ")]) == len(expected) + 1  # + the header

    refused = run_bench("forecast_bench", "--days", "1", timeout=120)  # no second day: nothing to forecast
    assert refused.returncode == 2 and "--days" in refused.stderr, refused.stderr[-2000:]


# ------------------------------------------------------------------------------------------ inference_bench
def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def test_inference_bench_smoke(tmp_path: Path) -> None:
    """Every part once, smallest: RTF torch vs onnxruntime, the half-precision vocoders' quality, the
    real HTTP server against the pipeline alone at 1 and 2 clients (share, added latency, time to
    first audio), the hot path, and the batching part of --cuda (on CUDA when
    there is a GPU, else on the CPU in fp32)."""
    cuda = _cuda_available()
    out = tmp_path / "inference.json"
    res = run_bench("inference_bench", "--smoke", "--json", str(out), *(["--cuda"] if cuda else []), timeout=420)
    completed(res)
    doc = json.loads(out.read_text())
    assert doc["smoke"] is True
    rtf = doc["cpu_rtf"]
    for engine in ("torch", "onnxruntime"):
        assert positive(rtf[engine]["rtf"]) and positive(rtf[engine]["audio_seconds"]), rtf
    assert positive(rtf["torch_vs_onnxruntime"]) and rtf["threads"] >= 1
    quality = doc["cpu_precision_quality"]
    assert quality["device"] == "cpu"
    for precision in ("fp16", "bf16"):
        assert finite(quality[precision]["snr_db"]), quality
        assert 0 <= quality[precision]["max_abs_diff"] <= 2, quality
        assert -1 <= quality[precision]["speaker_cosine"] <= 1.0001, quality
    http = doc["http"]
    assert http["rounds"] == 1 and http["torch_threads"] >= 1
    assert [row["clients"] for row in http["rows"]] == [1, 2]
    for row in http["rows"]:
        assert row["requests"] >= row["clients"], row
        for key in ("rps", "pipeline_rps", "share", "p50_s", "p95_s", "server_peak_rss_mib"):
            assert positive(row[key]), row
        assert all(threads >= 1 for threads in row["pipeline_threads"]), row
        for kind in ("ttfa_stream", "ttfa_sse", "whole_two_sentences"):
            assert positive(row[f"{kind}_p50_s"]) and positive(row[f"{kind}_p95_s"]), row
    assert finite(http["rows"][0]["added_p50_ms"]) and finite(http["rows"][0]["added_p95_ms"])  # one client
    hot = doc["hot_path"]
    assert hot["sentences"] == 10 and hot["repeats"] == 1
    for key in ("phonemize_per_sentence_s", "phonemize_one_call_s", "audio_cache_miss_s", "audio_cache_hit_s"):
        assert positive(hot[key]), hot
    assert positive(hot["phonemize_speedup"]) and positive(hot["audio_cache_speedup"]), hot
    if cuda:
        batching = doc["cuda"]
        precisions: tuple[str, ...] = ("fp32", "fp16", "bf16")
        assert batching["device"] and set(batching["quality"]) >= {"device", "fp16", "bf16"}
    else:
        assert "cuda" not in doc
        batching = doc["batching_cpu"]
        precisions = ("fp32",)
        assert batching["device"] == "cpu" and batching["fp32_peak_vram_mib"] is None
    for precision in precisions:
        for batch in (1, 2):
            figures = batching[f"{precision}_batch{batch}"]
            assert positive(figures["requests_per_s"]) and positive(figures["rtf"]), batching
        if cuda:
            assert positive(batching[f"{precision}_peak_vram_mib"]), batching


def test_inference_bench_cuda_without_a_gpu_stops_at_once() -> None:
    """--cuda on a machine without a GPU: a usage error naming the cause, before any part runs (no
    traceback after minutes of CPU figures)."""
    if _cuda_available():
        pytest.skip("this machine has a GPU: test_inference_bench_smoke runs --cuda")
    res = run_bench("inference_bench", "--cuda", "--requests", "1", timeout=120)
    assert res.returncode == 2, res.stderr[-3000:]
    assert "--cuda:" in res.stderr and "CUDA" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr and "[bench]" not in res.stderr, res.stderr[-3000:]
    assert res.stdout == ""


# ------------------------------------------------------------------------------------------ operator_bench
def test_operator_bench_smoke(cluster: LocalCluster, tmp_path: Path) -> None:
    """Two reaction trials and a scale run of two TTSDeployments on the session's cluster (the bench
    uses a cluster that is up and leaves it up, without its namespaces)."""
    out = tmp_path / "operator.json"
    args = ("--cluster", cluster.name, "--trials", "2", "--counts", "2", "--window", "12", "--json", str(out))
    res = run_bench("operator_bench", *args, timeout=400)
    completed(res)
    assert cluster.is_up()
    doc = json.loads(out.read_text())
    reaction = doc["reaction"]
    assert reaction["trials"] == 2 and reaction["interval_seconds"] > 0
    for key in ("median_seconds", "p95_seconds", "max_seconds"):
        assert positive(reaction[key]), reaction
    rows = doc["scale"]
    assert [r["reads"] for r in rows] == ["watch", "list"]  # the caches, and the LIST-per-round baseline
    for row in rows:
        assert row["ttsdeployments"] == 2 and row["rounds"] >= 1, row
        for key in ("round_seconds_mean", "ms_per_ttsdeployment", "queries_per_round", "operator_peak_rss_mib"):
            assert positive(row[key]), row
        assert finite(row["operator_cpu_percent"]) and finite(row["max_queries_in_a_round"]), row
        assert finite(row["api_requests_per_round"]), row
    watch, listing = rows
    assert listing["api_requests_per_round"] > watch["api_requests_per_round"]  # the LISTs the caches replace
    namespaces = cluster.kubectl("get", "namespaces", "-o", "json").stdout
    live = [
        ns["metadata"]["name"]
        for ns in json.loads(namespaces)["items"]
        if ns["metadata"]["name"].startswith("bench-") and ns["status"].get("phase") != "Terminating"
    ]
    assert not live, f"the bench left its namespaces: {live}"


# ------------------------------------------------------------------------------------------ fault_bench
@pytest.mark.cluster
def test_fault_bench_smoke(tmp_path: Path, reap_clusters: Callable[[str], None]) -> None:
    """One scenario (a competing HPA, one trial) on the bench's own dedicated cluster, brought up and torn
    down by the bench; exit 1 (a goal missed) is a finding, not a broken bench."""
    name = f"{os.environ.get('VOXSCALE_TEST_CLUSTER', 'pytest')}-fault-bench"
    reap_clusters(name)
    results = tmp_path / "results"
    args = ("--cluster", name, "--only", "competing-hpa", "--hpa-trials", "1", "--results", str(results))
    res = run_bench("fault_bench", *args, timeout=400)
    completed(res, codes=(0, 1))
    assert not LocalCluster(name).is_up(), "the fault bench left its cluster up"
    doc = json.loads((results / "fault-bench.json").read_text())
    assert doc["meta"]["scenarios"] == ["competing-hpa"]
    scenario = doc["scenarios"]["competing-hpa"]
    assert scenario["error"] is None, f"{scenario['error']}\nthe bench's stderr:\n{res.stderr[-4000:]}"
    assert positive(scenario["seconds"]), scenario
    figures = scenario["figures"]
    assert len(figures["detection_seconds"]) == len(figures["resolution_seconds"]) == 1, figures
    assert figures["conflict_events"] >= 0 and "writes_during_conflict" in figures, figures
    rows = doc["table"]
    assert rows and all(r["scenario"] == "competing-hpa" and r["figure"] for r in rows), rows
    assert not [r for r in rows if r["figure"] == "scenario error"], rows
    assert (results / "fault-bench.md").read_text().startswith("# Fault-injection bench")
