"""Forecast bench: which way of learning the daily pattern forecasts demand best, measured on the
simulator's multi-day traces (how operator/forecast.py's method was chosen).

    .venv/bin/python -m bench.forecast_bench [--json bench/results/forecast.json] [--days 3]

For every minute from the second day on, each method forecasts the peak arrival rate over the next
look-ahead (a 60 s pod start plus a 10 s interval) from the minute-by-minute history before it (the
trace's rate with Poisson noise, as Prometheus would hold it); the actual peak is the trace's. It
reports the median absolute percentage error, how often a forecast fell more than 10 % short (what
costs latency) and the mean overshoot (what costs GPU time). Timezones: each trace's own, and UTC as
a manifest that names none would have it.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import zoneinfo
from pathlib import Path
from typing import Any

import numpy as np

from voxscale.operator import forecast as fc
from voxscale.simulator import traces

LOOKAHEAD = dt.timedelta(seconds=70)
METHODS: dict[str, fc.Method] = {
    "yesterday, UTC clock": fc.Method(days=1, level_clamp=(1, 1), detect_shift=False, local_time=False),
    "yesterday, local clock": fc.Method(days=1, level_clamp=(1, 1), detect_shift=False),
    "max of 2 days": fc.Method(days=2, level_clamp=(1, 1), detect_shift=False),
    "max of 2 days, level": fc.Method(days=2, detect_shift=False),
    "max of 2 days, level, shift (default)": fc.DEFAULT_METHOD,
    "max of 3 days, level, shift": fc.Method(days=3),
}
CASES = [  # (trace, its users' timezone)
    ("daily-dst", "Europe/Berlin"),
    ("daily-outages", "UTC"),
    ("education", "Asia/Shanghai"),
    ("game-studio", "Europe/Berlin"),
]


def minute_history(trace: traces.Trace, seed: int = 0) -> fc.RateHistory:
    per_minute = int(60 / trace.step_seconds)
    n = len(trace.rps) // per_minute
    mean = trace.rps[: n * per_minute].reshape(n, per_minute).mean(axis=1)
    noisy = np.random.default_rng(seed).poisson(mean * 60) / 60
    return fc.RateHistory(trace.start, 60.0, noisy.astype(float))


def actual_peak(trace: traces.Trace, at: dt.datetime) -> float:
    i = int((at - trace.start).total_seconds() / trace.step_seconds)
    j = i + int(LOOKAHEAD.total_seconds() / trace.step_seconds)
    return float(trace.rps[i:j].max())


def evaluate(trace: traces.Trace, tz: zoneinfo.ZoneInfo, method: fc.Method) -> dict[str, float]:
    full = minute_history(trace)
    errors, short, over = [], 0, []
    minutes = len(full.rps)
    for m in range(1440, minutes - 2):
        now = trace.start + dt.timedelta(minutes=m)
        past = fc.RateHistory(full.start, 60.0, full.rps[:m])
        got = fc.forecast(past, now, LOOKAHEAD, tz, method=method)
        if not isinstance(got, fc.Forecast):
            continue
        actual = actual_peak(trace, now)
        if actual <= 0:
            continue
        errors.append(abs(got.peak_rps - actual) / actual)
        short += got.peak_rps < 0.9 * actual
        over.append(max(0.0, got.peak_rps - actual) / actual)
    return {
        "mape_median_percent": 100 * float(np.median(errors)),
        "short_by_10pct_percent": 100 * short / len(errors),
        "mean_overshoot_percent": 100 * float(np.mean(over)),
        "forecasts": len(errors),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="write the figures here")
    p.add_argument("--days", type=float, default=3.0, help="length of each trace (default %(default)s)")
    args = p.parse_args(argv)
    if args.days <= 1:
        p.error("--days: more than 1 (forecasts start on the second day; 1.01 is the smallest run, seconds)")
    results: list[dict[str, Any]] = []
    for name, zone in CASES:
        trace = traces.SCENARIOS[name](days=args.days)
        for tz_name in dict.fromkeys([zone, "UTC"]):
            for label, method in METHODS.items():
                print(f"[forecast-bench] {name} ({tz_name}): {label}", file=sys.stderr, flush=True)
                row = evaluate(trace, zoneinfo.ZoneInfo(tz_name), method)
                results.append({"trace": name, "timezone": tz_name, "method": label, **row})
    print("| trace | timezone configured | method | median error | short by >10 % | mean overshoot |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['trace']} | {r['timezone']} | {r['method']} | {r['mape_median_percent']:.1f} % | "
            f"{r['short_by_10pct_percent']:.2f} % | {r['mean_overshoot_percent']:.1f} % |"
        )
    if args.json:
        args.json.write_text(json.dumps({"lookahead_seconds": LOOKAHEAD.total_seconds(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
