"""Generalization bench: voxscale on (trace, manifest) pairs it was never tuned on, against the KEDA +
HPA model, the Knative KPA model and the clairvoyant oracle.

    .venv/bin/python -m bench.generalize [--pairs 210] [--jobs 2] [--quick] [--out FILE]
        [--seed 22] [--only 3,6,24] [--peers-from EARLIER.json]

Pair i draws everything from numpy's generator seeded (SEED, i): the trace kind and the manifest kind
cycle so each trace kind meets each manifest kind (voxscale.simulator.generators), the numbers
inside them, the peak load, the batch size and the cold start are random. The seed is committed and
was not chosen: losing pairs stay in the set. Poisson arrivals (seed i); the daily kinds (diurnal,
weekly from a Friday, diurnal with outages) last 2 days so day 2 can be learnt from day 1, the others
1 day. Cost: 12-13 CPU-seconds per simulated day of a pair (four autoscalers; the stochastic fleet
model about two thirds of it, mostly its per-sub-step binomial draws; voxscale's decide() a third) on
the shared two-core box; `--pairs 42` (60 simulated days) took 17.5 minutes there under a load
average of ~4.5 from other work. 210 pairs are ~270 simulated days: ~30 minutes on two idle cores.
`--pairs 42` meets every trace kind x manifest kind once.

Progress goes to stderr; a markdown report (distributions per axis, per-kind win rates, the "Done
when" checks of issue 21 as pass/fail lines, the losing pairs) to stdout; every figure to
bench/results/generalize.json (--out). Exit 0 whether or not the checks pass: a failed check is a
finding, reported, not a broken bench.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from voxscale.operator.policy import ScalingPolicy
from voxscale.simulator import generators
from voxscale.simulator.baselines import KedaHpaModel, OracleAutoscaler, schedule_floors
from voxscale.simulator.generators import SEED, Pair, build, pairs
from voxscale.simulator.kpa import KpaModel
from voxscale.simulator.policies import Autoscaler, VoxscaleAutoscaler
from voxscale.simulator.run import rate_window, simulate

RESULTS = Path(__file__).resolve().parent / "results" / "generalize.json"
SLO_SECONDS = 2.0
PEERS = ("keda", "kpa")
ROLES = ("voxscale", "keda", "kpa", "oracle")
# Issue 21's "Done when" thresholds.
SLO_MARGIN_PP = 0.1
DOMINATED_GPU = 0.02
SHARE_NOT_WORSE = 0.95
HIGH_SLO = 99.5
SHARE_CHEAPER = 0.90
REVERSALS_SLACK = 2.0
PERIODIC_SLO = 99.9
PERIODIC_ORACLE = 1.15


def say(msg: str) -> None:
    print(f"[generalize] {msg}", file=sys.stderr, flush=True)


def run_pair(pair: Pair, reused: dict[str, Any] | None = None) -> dict[str, Any]:
    """Every contender on one pair (runs in a worker process); their summaries and the cost. The
    peers' and the oracle's runs are taken from `reused` (a row of an earlier run of the same pair)
    where given: only voxscale changed, and they do not depend on it."""
    started = time.process_time()
    trace, ttsd, capacity = build(pair)
    policy = ScalingPolicy.from_spec(ttsd["spec"])
    floors = schedule_floors(trace, policy)
    oracle = OracleAutoscaler.for_trace(trace, capacity, SLO_SECONDS, policy.min_replicas, policy.max_replicas, floors)
    contenders: dict[str, tuple[Autoscaler, int]] = {
        "voxscale": (VoxscaleAutoscaler(policy), policy.min_replicas),
        "keda": (KedaHpaModel(policy), policy.min_replicas),
        "kpa": (KpaModel(policy, capacity, floors, trace.start.timestamp(), trace.step_seconds), policy.min_replicas),
        "oracle": (oracle, int(oracle.plan[0])),
    }
    window = rate_window(policy)
    runs = {role: reused["runs"][role] for role in ROLES if role != "voxscale"} if reused else {}
    for role, (scaler, initial) in contenders.items():
        if role in runs:
            continue
        result = simulate(
            trace, scaler, capacity, initial, SLO_SECONDS, 2.5, policy.min_replicas, True, pair.index, False, window
        )
        runs[role] = asdict(result.summary)
    return {
        **asdict(pair),
        "trace": trace.description,
        "manifest": ttsd["spec"],
        "cold_start_seconds": capacity.cold_start_seconds,
        "peak_rps": float(np.max(trace.rps)),
        "cpu_seconds": time.process_time() - started,
        "runs": runs,
    }


# --- judging --------------------------------------------------------------------------------------


def verdicts(row: dict[str, Any], peer: str) -> dict[str, bool | None]:
    """Each "Done when" condition on one pair against one peer (None: does not apply)."""
    vox, other = row["runs"]["voxscale"], row["runs"][peer]
    deficit = other["within_slo_percent"] - vox["within_slo_percent"]
    cheaper = other["gpu_hours"] <= (1 - DOMINATED_GPU) * vox["gpu_hours"]
    both_high = min(vox["within_slo_percent"], other["within_slo_percent"]) >= HIGH_SLO
    return {
        "not_dominated": not (deficit >= SLO_MARGIN_PP and cheaper),
        "slo_not_worse": deficit <= SLO_MARGIN_PP,
        "cheaper_when_both_high": vox["gpu_hours"] <= other["gpu_hours"] if both_high else None,
        "reversals_within_slack": vox["reversals_per_day"] <= other["reversals_per_day"] + REVERSALS_SLACK,
    }


def periodic_ok(row: dict[str, Any]) -> bool | None:
    """On a periodic trace, from day 2: >= 99.9 % within SLO at <= 1.15x the oracle's GPU-hours."""
    if row["trace_kind"] not in generators.PERIODIC:
        return None
    vox, oracle = row["runs"]["voxscale"], row["runs"]["oracle"]
    slo, gpu, floor = vox["within_slo_after_day1_percent"], vox["gpu_hours_after_day1"], oracle["gpu_hours_after_day1"]
    if slo is None or gpu is None or not floor:
        return None
    return bool(slo >= PERIODIC_SLO and gpu / floor <= PERIODIC_ORACLE)


def _share(values: list[bool | None]) -> tuple[float, int]:
    seen = [v for v in values if v is not None]
    return (sum(seen) / len(seen) if seen else 1.0), len(seen)


def checks(rows: list[dict[str, Any]], peer: str) -> list[dict[str, Any]]:
    """Issue 21's pass/fail lines against one peer."""
    v = [verdicts(r, peer) for r in rows]
    share_ok, n_ok = _share([x["slo_not_worse"] for x in v])
    share_cheap, n_cheap = _share([x["cheaper_when_both_high"] for x in v])
    dominated = [r["index"] for r, x in zip(rows, v, strict=True) if not x["not_dominated"]]
    flapping = [r["index"] for r, x in zip(rows, v, strict=True) if not x["reversals_within_slack"]]
    out = [
        {
            "check": f"never dominated by {peer} (>= {SLO_MARGIN_PP} pp more in SLO and >= 2 % fewer GPU-h)",
            "passed": not dominated,
            "detail": f"dominated on {len(dominated)}: {dominated[:20]}",
        },
        {
            "check": f"in SLO >= {peer} - {SLO_MARGIN_PP} pp on >= 95 % of pairs",
            "passed": share_ok >= SHARE_NOT_WORSE,
            "detail": f"{share_ok:.1%} of {n_ok}",
        },
        {
            "check": f"where both >= {HIGH_SLO} %, GPU-h <= {peer}'s on >= 90 %",
            "passed": share_cheap >= SHARE_CHEAPER,
            "detail": f"{share_cheap:.1%} of {n_cheap}",
        },
        {
            "check": f"reversals <= {peer}'s + 2/day on every pair",
            "passed": not flapping,
            "detail": f"over on {len(flapping)}: {flapping[:20]}",
        },
    ]
    if peer == "keda":
        periodic = [(r["index"], periodic_ok(r)) for r in rows]
        failed = [i for i, ok in periodic if ok is False]
        n = sum(ok is not None for _, ok in periodic)
        out.append(
            {
                "check": "periodic pairs from day 2: >= 99.9 % in SLO at <= 1.15x oracle",
                "passed": not failed,
                "detail": f"failed {len(failed)} of {n}: {failed[:20]}",
            }
        )
    return out


def _quantiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    q = np.quantile(np.asarray(values, dtype=float), [0, 0.05, 0.5, 0.95, 1])
    return dict(zip(("min", "p5", "median", "p95", "max"), (float(x) for x in q), strict=True))


def distributions(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per axis, against each peer: win rates and quantiles."""
    out: dict[str, Any] = {}
    for peer in PEERS:
        vox = [r["runs"]["voxscale"] for r in rows]
        other = [r["runs"][peer] for r in rows]
        out[peer] = {
            "slo_win_rate": statistics.mean(
                v["within_slo_percent"] >= o["within_slo_percent"] - SLO_MARGIN_PP
                for v, o in zip(vox, other, strict=True)
            ),
            "gpu_win_rate": statistics.mean(v["gpu_hours"] <= o["gpu_hours"] for v, o in zip(vox, other, strict=True)),
            "slo_deficit_pp": _quantiles(
                [o["within_slo_percent"] - v["within_slo_percent"] for v, o in zip(vox, other, strict=True)]
            ),
            "gpu_hours_ratio": _quantiles([v["gpu_hours"] / o["gpu_hours"] for v, o in zip(vox, other, strict=True)]),
            "reversals_per_day": _quantiles([o["reversals_per_day"] for o in other]),
            "within_slo_percent": _quantiles([o["within_slo_percent"] for o in other]),
            "gpu_hours_vs_oracle": _quantiles(
                [o["gpu_hours"] / r["runs"]["oracle"]["gpu_hours"] for o, r in zip(other, rows, strict=True)]
            ),
        }
    vox = [r["runs"]["voxscale"] for r in rows]
    out["voxscale"] = {
        "within_slo_percent": _quantiles([v["within_slo_percent"] for v in vox]),
        "reversals_per_day": _quantiles([v["reversals_per_day"] for v in vox]),
        "gpu_hours_vs_oracle": _quantiles(
            [v["gpu_hours"] / r["runs"]["oracle"]["gpu_hours"] for v, r in zip(vox, rows, strict=True)]
        ),
    }
    return out


def by_kind(rows: list[dict[str, Any]], key: str) -> dict[str, dict[str, float]]:
    """Per trace (or manifest) kind: pairs, and the share where voxscale is not worse on SLO and
    not dearer, against each peer."""
    out: dict[str, dict[str, float]] = {}
    for kind in dict.fromkeys(r[key] for r in rows):
        group = [r for r in rows if r[key] == kind]
        entry: dict[str, float] = {"pairs": len(group)}
        for peer in PEERS:
            v = [verdicts(r, peer) for r in group]
            entry[f"slo_not_worse_vs_{peer}"] = _share([x["slo_not_worse"] for x in v])[0]
            entry[f"gpu_le_vs_{peer}"] = statistics.mean(
                r["runs"]["voxscale"]["gpu_hours"] <= r["runs"][peer]["gpu_hours"] for r in group
            )
        entry["worst_slo_percent"] = min(r["runs"]["voxscale"]["within_slo_percent"] for r in group)
        out[kind] = entry
    return out


def losing(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pairs where any check fails against a peer, with their kind and the figures."""
    out = []
    for r in rows:
        failed = [f"{peer}:{name}" for peer in PEERS for name, ok in verdicts(r, peer).items() if ok is False]
        if periodic_ok(r) is False:
            failed.append("periodic")
        if failed:
            vox, keda, kpa = (r["runs"][k] for k in ("voxscale", "keda", "kpa"))
            out.append(
                {
                    "index": r["index"],
                    "trace_kind": r["trace_kind"],
                    "manifest_kind": r["manifest_kind"],
                    "failed": failed,
                    "within_slo": [vox["within_slo_percent"], keda["within_slo_percent"], kpa["within_slo_percent"]],
                    "gpu_hours": [vox["gpu_hours"], keda["gpu_hours"], kpa["gpu_hours"]],
                    "reversals_per_day": [
                        vox["reversals_per_day"],
                        keda["reversals_per_day"],
                        kpa["reversals_per_day"],
                    ],
                }
            )
    return out


# --- report ---------------------------------------------------------------------------------------


def _q(d: dict[str, float], fmt: str) -> str:
    return " / ".join(format(d[k], fmt) for k in ("min", "p5", "median", "p95", "max")) if d else "-"


def report(doc: dict[str, Any]) -> str:
    dist = doc["distributions"]
    lines = [
        f"# Generalization bench: {doc['pairs']} pairs (seed {doc['seed']}), "
        f"{doc['simulated_days']:.0f} simulated days, "
        f"{doc['cpu_seconds_per_simulated_day']:.1f} CPU s per simulated day (4 autoscalers)",
        "",
        "| axis (min / p5 / median / p95 / max) | voxscale | keda+hpa (model) | kpa (model) |",
        "|---|---|---|---|",
        f"| within SLO % | {_q(dist['voxscale']['within_slo_percent'], '.2f')} | "
        f"{_q(dist['keda']['within_slo_percent'], '.2f')} | {_q(dist['kpa']['within_slo_percent'], '.2f')} |",
        f"| GPU-h / oracle | {_q(dist['voxscale']['gpu_hours_vs_oracle'], '.2f')} | "
        f"{_q(dist['keda']['gpu_hours_vs_oracle'], '.2f')} | {_q(dist['kpa']['gpu_hours_vs_oracle'], '.2f')} |",
        f"| reversals / day | {_q(dist['voxscale']['reversals_per_day'], '.1f')} | "
        f"{_q(dist['keda']['reversals_per_day'], '.1f')} | {_q(dist['kpa']['reversals_per_day'], '.1f')} |",
        f"| SLO deficit vs peer, pp (peer - voxscale) | | {_q(dist['keda']['slo_deficit_pp'], '.2f')} | "
        f"{_q(dist['kpa']['slo_deficit_pp'], '.2f')} |",
        f"| GPU-h voxscale / peer | | {_q(dist['keda']['gpu_hours_ratio'], '.2f')} | "
        f"{_q(dist['kpa']['gpu_hours_ratio'], '.2f')} |",
        f"| win rate: in SLO >= peer - 0.1 pp | | {dist['keda']['slo_win_rate']:.1%} | "
        f"{dist['kpa']['slo_win_rate']:.1%} |",
        f"| win rate: GPU-h <= peer | | {dist['keda']['gpu_win_rate']:.1%} | {dist['kpa']['gpu_win_rate']:.1%} |",
        "",
        "| kind | pairs | in SLO not worse vs keda | GPU-h <= keda | in SLO not worse vs kpa | GPU-h <= kpa "
        "| worst voxscale in SLO % |",
        "|---|---|---|---|---|---|---|",
    ]
    for key in ("by_trace_kind", "by_manifest_kind"):
        for kind, e in doc[key].items():
            lines.append(
                f"| {kind} | {e['pairs']:.0f} | {e['slo_not_worse_vs_keda']:.0%} | {e['gpu_le_vs_keda']:.0%} | "
                f"{e['slo_not_worse_vs_kpa']:.0%} | {e['gpu_le_vs_kpa']:.0%} | {e['worst_slo_percent']:.2f} |"
            )
    lines += ["", "Done when (issue 21):"]
    for peer, result in doc["checks"].items():
        for c in result:
            lines.append(f"- {'PASS' if c['passed'] else 'FAIL'} [{peer}] {c['check']}: {c['detail']}")
    lines += ["", f"Losing pairs ({len(doc['losing'])}; in SLO % and GPU-h as voxscale / keda / kpa):"]
    for p in doc["losing"]:
        lines.append(
            f"- #{p['index']} {p['trace_kind']} x {p['manifest_kind']}: {', '.join(p['failed'])}; in SLO "
            + " / ".join(f"{x:.2f}" for x in p["within_slo"])
            + "; GPU-h "
            + " / ".join(f"{x:.1f}" for x in p["gpu_hours"])
            + "; reversals/day "
            + " / ".join(f"{x:.1f}" for x in p["reversals_per_day"])
        )
    return "\n".join(lines)


def _run_job(job: tuple[Pair, dict[str, Any] | None]) -> dict[str, Any]:
    return run_pair(*job)


def run_all(todo: list[Pair], jobs: int, reuse: dict[int, dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []

    def note(row: dict[str, Any]) -> None:
        rows.append(row)
        vox, keda = row["runs"]["voxscale"], row["runs"]["keda"]
        say(
            f"{len(rows)}/{len(todo)} #{row['index']} {row['trace_kind']} x {row['manifest_kind']}: voxscale "
            f"{vox['within_slo_percent']:.2f} % {vox['gpu_hours']:.1f} GPU-h, keda {keda['within_slo_percent']:.2f} % "
            f"{keda['gpu_hours']:.1f} GPU-h ({time.perf_counter() - started:.0f} s so far)"
        )

    work = [(p, (reuse or {}).get(p.index)) for p in todo]
    if jobs <= 1:
        for job in work:
            note(_run_job(job))
    else:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            for row in pool.imap_unordered(_run_job, work):
                note(row)
    rows.sort(key=lambda r: r["index"])
    return rows


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=210, help="pairs to run, from pair 0 (default %(default)s)")
    p.add_argument("--days", type=float, help="override every trace's length in days (smoke runs)")
    p.add_argument("--quick", action="store_true", help="a smoke run: 7 pairs of 0.05 days")
    p.add_argument("--jobs", type=int, default=2, help="worker processes (default %(default)s)")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results (default %(default)s)")
    p.add_argument("--seed", type=int, default=SEED, help="draw the pairs from another seed: a held-out set")
    p.add_argument("--only", help="comma-separated pair indices to run (of the --seed's pairs), e.g. 3,6,24")
    p.add_argument(
        "--peers-from",
        type=Path,
        help="an earlier results JSON of the same seed: take the peers' and the oracle's runs of each pair "
        "from it (they do not depend on voxscale) and simulate voxscale alone",
    )
    args = p.parse_args(argv)
    if args.quick:
        args.pairs, args.days = min(args.pairs, 7), args.days or 0.05
    if args.pairs < 1:
        p.error("--pairs: must be at least 1")
    if args.days is not None and args.days <= 0:
        p.error("--days: must be > 0")
    return args


def _reused(path: Path, seed: int, days: float | None) -> dict[int, dict[str, Any]]:
    """The rows of an earlier run of the same pairs (same seed and length), by index."""
    doc = json.loads(path.read_text())
    if doc.get("seed", SEED) != seed:
        raise SystemExit(f"--peers-from {path}: seed {doc.get('seed')}, not {seed}")
    rows = doc["rows"]
    return {r["index"]: r for r in rows if days is None or r["days"] == days}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    only = sorted({int(i) for i in args.only.split(",") if i.strip()}) if args.only else None
    todo = pairs(max(only) + 1 if only else args.pairs, args.days, args.seed)
    if only:
        todo = [p for p in todo if p.index in only]
    reuse = _reused(args.peers_from, args.seed, args.days) if args.peers_from else None
    say(f"{len(todo)} pairs (seed {args.seed}), {args.jobs} at a time")
    started = time.perf_counter()
    rows = run_all(todo, args.jobs, reuse)
    days = sum(r["days"] for r in rows)
    doc: dict[str, Any] = {
        "seed": args.seed,
        "pairs": len(rows),
        "simulated_days": days,
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds_per_simulated_day": sum(r["cpu_seconds"] for r in rows) / days,
        "distributions": distributions(rows),
        "by_trace_kind": by_kind(rows, "trace_kind"),
        "by_manifest_kind": by_kind(rows, "manifest_kind"),
        "checks": {peer: checks(rows, peer) for peer in PEERS},
        "losing": losing(rows),
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    print(report(doc))
    say(f"results written to {args.out} ({doc['wall_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
