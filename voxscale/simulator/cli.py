"""The `voxscale simulate` command: argument parsing and error reporting around run.compare()."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import yaml

from voxscale.operator import crd
from voxscale.operator.policy import ScalingPolicy, SpecError
from voxscale.simulator import traces
from voxscale.simulator.model import CapacityModel
from voxscale.simulator.policies import VoxscaleAutoscaler
from voxscale.simulator.run import compare, format_table, plot

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def add_arguments(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--scenario", choices=sorted(traces.SCENARIOS), help="a built-in trace from the seed documents")
    src.add_argument(
        "--trace",
        type=Path,
        help="CSV with a header `timestamp,rps` (or requests_per_second; seconds or ISO-8601), "
        "optionally a metrics_up column (1, or 0 during a metrics outage)",
    )
    src.add_argument(
        "--requests",
        type=Path,
        metavar="LOG.csv",
        help="a per-request log, as an access log has it: a `timestamp` column (seconds or ISO-8601), "
        "optionally each request's size as `chars` or `audio_seconds`; binned at --step, each request's "
        "service time in proportion to its size (the log's mean request takes --service-seconds)",
    )
    p.add_argument(
        "--manifest",
        "-f",
        type=Path,
        help="the TTSDeployment YAML to simulate (default for a scenario: its example manifest)",
    )
    p.add_argument("--step", type=float, default=1.0, help="simulation step in seconds (default %(default)s)")
    p.add_argument(
        "--days", type=float, help="length of a daily scenario in days (default 1, 3 for daily-dst/daily-outages)"
    )
    p.add_argument("--slo", type=float, default=2.0, help="latency SLO in seconds (default %(default)s)")
    p.add_argument("--price", type=float, default=2.5, help="$ per GPU-hour (default %(default)s)")
    p.add_argument(
        "--service-seconds",
        type=float,
        default=CapacityModel.service_seconds,
        help="GPU time per request at full batch (default %(default)s)",
    )
    p.add_argument(
        "--cold-start",
        type=float,
        default=CapacityModel.cold_start_seconds,
        help="seconds from scale-up to a Ready pod (default %(default)s)",
    )
    p.add_argument(
        "--measured",
        type=Path,
        metavar="JSON",
        help="take one replica's capacity from an inference benchmark result "
        "(bench/results/inference.json): its peak requests/s and single-client latency",
    )
    p.add_argument("--stochastic", action="store_true", help="Poisson arrivals and exponential service")
    p.add_argument("--seed", type=int, default=0, help="random seed of the stochastic arrivals (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--plot", type=Path, help="write a PNG: load, replicas, p95 latency over time")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def load_manifest(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise SpecError(str(path), "no such file")
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    except yaml.YAMLError as exc:
        raise SpecError(str(path), f"not valid YAML: {exc}") from None
    found = [d for d in docs if isinstance(d, dict) and d.get("kind") == crd.KIND]
    if len(found) != 1:
        raise SpecError(str(path), f"expected exactly one {crd.KIND}, found {len(found)}")
    return checked_manifest(found[0])


def checked_manifest(doc: dict[str, Any]) -> dict[str, Any]:
    """A TTSDeployment document validated against the CRD (as the API server would) and defaulted;
    a SpecError names the first field at fault."""
    problems = crd.validate(doc)
    if problems:
        field, _, message = problems[0].partition(": ")
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:])})" if len(problems) > 1 else ""
        raise SpecError(field, message + more)
    return crd.apply_defaults(doc)


def measured_capacity(path: Path, base: CapacityModel) -> CapacityModel:
    """One replica as the inference benchmark measured it: service time = single-client p50 latency,
    parallel slots = the highest measured throughput x that service time (at least 1)."""
    result = json.loads(path.read_text())
    rows = result["http"]
    service = float(next(r for r in rows if r["clients"] == 1)["p50_s"])
    peak_rps = max(float(r["rps"]) for r in rows)
    slots = max(1, round(peak_rps * service))
    return CapacityModel(
        slots=slots,
        service_seconds=peak_rps and slots / peak_rps,
        max_queue=base.max_queue,
        cold_start_seconds=base.cold_start_seconds,
        gpus_per_replica=base.gpus_per_replica,
    )


def scenario_trace(name: str, step_seconds: float = 1.0, days: float | None = None) -> traces.Trace:
    """A built-in scenario; `days` applies to the daily ones (course-launch lasts hours)."""
    kwargs: dict[str, Any] = {"step_seconds": step_seconds}
    if days and name in traces.MULTI_DAY:
        kwargs["days"] = days
    return traces.SCENARIOS[name](**kwargs)


def capacity_from_manifest(
    ttsd: dict[str, Any],
    service_seconds: float = CapacityModel.service_seconds,
    cold_start_seconds: float = CapacityModel.cold_start_seconds,
) -> CapacityModel:
    """One replica as the (defaulted) manifest describes it: its batch is its slots, its queue bound
    the point where it answers 429."""
    model = ttsd["spec"]["model"]
    return CapacityModel(
        slots=int(model.get("maxBatchSize", 8)),
        service_seconds=service_seconds,
        max_queue=int(model.get("maxQueueLength", 64)),
        cold_start_seconds=cold_start_seconds,
        gpus_per_replica=max(1, int(ttsd["spec"].get("resources", {}).get("gpus", 1))),
    )


def run(args: argparse.Namespace) -> int:
    try:
        if args.scenario:
            trace = scenario_trace(args.scenario, args.step, args.days)
            manifest_path = args.manifest or EXAMPLES / traces.SCENARIO_MANIFESTS[args.scenario]
            if not manifest_path.exists():
                raise SpecError(str(manifest_path), f"no such file; pass --manifest for scenario {args.scenario}")
        else:
            if args.requests:
                trace = traces.load_requests(args.requests, args.step)
            else:
                trace = traces.load_csv(args.trace, args.step)
            if args.manifest is None:
                raise SpecError("--manifest", "a CSV trace or request log needs the TTSDeployment manifest to simulate")
            manifest_path = args.manifest
        ttsd = load_manifest(manifest_path)
        policy = ScalingPolicy.from_spec(ttsd["spec"])
    except (SpecError, traces.TraceError) as exc:
        print(f"voxscale simulate: {exc}", file=sys.stderr)
        return 2
    capacity = capacity_from_manifest(ttsd, args.service_seconds, args.cold_start)
    if args.measured:
        try:
            capacity = measured_capacity(args.measured, capacity)
        except (OSError, ValueError, KeyError) as exc:
            print(f"voxscale simulate: --measured {args.measured}: {exc}", file=sys.stderr)
            return 2
    result = compare(
        trace,
        VoxscaleAutoscaler(policy),
        capacity,
        args.slo,
        args.price,
        args.stochastic,
        progress=not args.no_progress and not args.json,
        seed=args.seed,
    )
    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print(format_table(result))
    if args.plot:
        plot(result, str(args.plot))
        if not args.json:
            print(f"plot written to {args.plot}")
    return 0
