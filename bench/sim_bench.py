"""Simulator benchmark: every built-in scenario, each with its example manifest and with
examples/minimal.yaml, Poisson arrivals, several seeds (the median is reported), against a static
fleet for the peak, the KEDA + HPA model, the clairvoyant oracle and the Knative KPA model.

    .venv/bin/python -m bench.sim_bench [--scenarios daily-dst,course-launch] [--seeds 3] [--jobs 2]

Progress goes to stderr; a markdown table to stdout; every figure, per seed and median, to
bench/results/sim-bench.json (--out). A 3-day scenario takes some 25 s per seed and manifest.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from voxscale.operator.policy import ScalingPolicy, SpecError
from voxscale.simulator import traces
from voxscale.simulator.cli import EXAMPLES, capacity_from_manifest, load_manifest, scenario_trace
from voxscale.simulator.policies import VoxscaleAutoscaler
from voxscale.simulator.run import ROLES, compare

MINIMAL = "minimal.yaml"
RESULTS = Path(__file__).resolve().parent / "results" / "sim-bench.json"


def say(msg: str) -> None:
    print(f"[sim-bench] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Case:
    scenario: str
    manifest: str  # a file name under examples/
    seed: int
    days: float | None = None


def run_case(case: Case) -> dict[str, Any]:
    """One scenario x manifest x seed: every contender's summary (runs in a worker process)."""
    ttsd = load_manifest(EXAMPLES / case.manifest)
    trace = scenario_trace(case.scenario, days=case.days)
    started = time.perf_counter()
    result = compare(
        trace,
        VoxscaleAutoscaler(ScalingPolicy.from_spec(ttsd["spec"])),
        capacity_from_manifest(ttsd),
        stochastic=True,
        seed=case.seed,
    )
    return {
        **asdict(case),
        "hours": trace.seconds / 3600,
        "wall_seconds": time.perf_counter() - started,
        "runs": {role: asdict(r.summary) for role, r in zip(ROLES, result.runs, strict=True)},
    }


def cases(scenarios: list[str], seeds: int, days: float | None) -> list[Case]:
    out = []
    for name in scenarios:
        for manifest in dict.fromkeys([traces.SCENARIO_MANIFESTS[name], MINIMAL]):
            out += [Case(name, manifest, seed, days) for seed in range(seeds)]
    return out


def check_manifests(todo: list[Case]) -> None:
    """Fail before hours of simulation if a manifest is missing or invalid, naming it."""
    for manifest in dict.fromkeys(c.manifest for c in todo):
        ScalingPolicy.from_spec(load_manifest(EXAMPLES / manifest)["spec"])


def run_all(todo: list[Case], jobs: int) -> list[dict[str, Any]]:
    started = time.perf_counter()
    done: list[dict[str, Any]] = []

    def report(row: dict[str, Any]) -> None:
        done.append(row)
        vox, keda = row["runs"]["voxscale"], row["runs"]["keda"]
        say(
            f"{len(done)}/{len(todo)} {row['scenario']} x {row['manifest']} seed {row['seed']}: "
            f"voxscale {vox['gpu_hours']:.1f} GPU-h {vox['within_slo_percent']:.1f} % in SLO, "
            f"keda {keda['gpu_hours']:.1f} GPU-h {keda['within_slo_percent']:.1f} % "
            f"({row['wall_seconds']:.0f} s; {time.perf_counter() - started:.0f} s so far)"
        )

    if jobs <= 1:
        for case in todo:
            report(run_case(case))
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs) as pool:
            for future in concurrent.futures.as_completed([pool.submit(run_case, c) for c in todo]):
                report(future.result())
    return done


def _median(rows: list[dict[str, Any]], role: str, key: str) -> float | None:
    values = [r["runs"][role][key] for r in rows if r["runs"][role][key] is not None]
    return statistics.median(values) if values else None


def _median_ratio(rows: list[dict[str, Any]], key: str, over: str) -> float | None:
    """Median over seeds of voxscale's figure over another contender's (paired by seed)."""
    ratios = [
        r["runs"]["voxscale"][key] / r["runs"][over][key]
        for r in rows
        if r["runs"]["voxscale"][key] is not None and r["runs"][over][key]
    ]
    return statistics.median(ratios) if ratios else None


def summarise(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Medians over seeds, one entry per scenario x manifest, in the order first run."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["scenario"], r["manifest"]), []).append(r)
    out = []
    for (scenario, manifest), group in groups.items():
        entry: dict[str, Any] = {"scenario": scenario, "manifest": manifest, "seeds": len(group)}
        entry["hours"] = group[0]["hours"]
        for role in ROLES:
            for key in (
                "gpu_hours",
                "within_slo_percent",
                "gpu_hours_after_day1",
                "within_slo_after_day1_percent",
                "reversals_per_day",
            ):
                entry[f"{role}_{key}"] = _median(group, role, key)
        entry["voxscale_over_keda_gpu_hours"] = _median_ratio(group, "gpu_hours", "keda")
        entry["voxscale_over_oracle_gpu_hours"] = _median_ratio(group, "gpu_hours", "oracle")
        entry["voxscale_over_oracle_gpu_hours_after_day1"] = _median_ratio(group, "gpu_hours_after_day1", "oracle")
        out.append(entry)
    return out


def _f(x: float | None, fmt: str) -> str:
    return "-" if x is None else format(x, fmt)


def table(summary: list[dict[str, Any]]) -> str:
    head = [
        "scenario",
        "manifest",
        "voxscale GPU-h",
        "KEDA GPU-h",
        "voxscale/KEDA",
        "voxscale in SLO %",
        "KEDA in SLO %",
        "oracle GPU-h",
        "voxscale/oracle",
        "day 2+ voxscale in SLO %",
        "day 2+ KEDA in SLO %",
        "day 2+ voxscale/oracle",
        "KPA GPU-h",
        "KPA in SLO %",
        "reversals/day voxscale / KEDA / KPA",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for e in summary:
        cells = [
            e["scenario"],
            e["manifest"],
            _f(e["voxscale_gpu_hours"], ".1f"),
            _f(e["keda_gpu_hours"], ".1f"),
            _f(e["voxscale_over_keda_gpu_hours"], ".2f"),
            _f(e["voxscale_within_slo_percent"], ".2f"),
            _f(e["keda_within_slo_percent"], ".2f"),
            _f(e["oracle_gpu_hours"], ".1f"),
            _f(e["voxscale_over_oracle_gpu_hours"], ".2f"),
            _f(e["voxscale_within_slo_after_day1_percent"], ".2f"),
            _f(e["keda_within_slo_after_day1_percent"], ".2f"),
            _f(e["voxscale_over_oracle_gpu_hours_after_day1"], ".2f"),
            _f(e["kpa_gpu_hours"], ".1f"),
            _f(e["kpa_within_slo_percent"], ".2f"),
            " / ".join(_f(e[f"{r}_reversals_per_day"], ".1f") for r in ("voxscale", "keda", "kpa")),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--scenarios",
        default=",".join(traces.SCENARIOS),
        help="comma-separated scenarios (default: all: %(default)s)",
    )
    p.add_argument("--seeds", type=int, default=3, help="seeds of the Poisson arrivals per case (default %(default)s)")
    p.add_argument("--days", type=float, help="length of the daily scenarios (default: each scenario's own)")
    p.add_argument("--jobs", type=int, default=1, help="cases simulated in parallel (default %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results (default %(default)s)")
    args = p.parse_args(argv)
    unknown = [s for s in args.scenarios.split(",") if s not in traces.SCENARIOS]
    if unknown:
        p.error(f"--scenarios: unknown {unknown}; choose from {', '.join(traces.SCENARIOS)}")
    if args.seeds < 1:
        p.error("--seeds: must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    todo = cases(args.scenarios.split(","), args.seeds, args.days)
    try:
        check_manifests(todo)
    except SpecError as exc:
        print(f"sim-bench: {exc}", file=sys.stderr)
        return 2
    say(f"{len(todo)} cases ({args.seeds} seeds each), {args.jobs} at a time")
    rows = run_all(todo, args.jobs)
    order = {c: i for i, c in enumerate(todo)}
    rows.sort(key=lambda r: order[Case(r["scenario"], r["manifest"], r["seed"], r["days"])])
    summary = summarise(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"summary": summary, "cases": rows}, indent=2))
    print(table(summary))
    say(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
