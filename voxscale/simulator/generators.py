"""Random traffic traces and manifests of kinds the project's own scenarios never had, for measuring
how the engine generalises (bench/generalize.py). Every draw comes from the generator passed in, so
a committed seed gives the same pair; nothing here knows which autoscaler is measured.

Traces are requests per second at 1 s steps, scaled so the peak needs `peak_replicas` replicas of
`rps_per_replica` at 75 % busy. A request-mix shift also sets `Trace.cost`, the service time per
request relative to the capacity model's (1 = the model's), so the same rps costs more GPU.
Manifests are TTSDeployment documents as users write them: the seed rules with varied numbers,
HPA/KEDA-habit targets, cron floors, scale-down windows, or nothing but replica bounds.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxscale.simulator.cli import capacity_from_manifest, checked_manifest
from voxscale.simulator.model import CapacityModel
from voxscale.simulator.traces import Trace

MONDAY = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
FRIDAY = MONDAY + dt.timedelta(days=4)
BUSY = 0.75  # the share of a replica's capacity the peak is drawn against

Generator = Callable[[np.random.Generator, float, float], Trace]


def _slow_noise(rng: np.random.Generator, n: int, scale: float, period_s: float = 60.0) -> np.ndarray:
    """Multiplicative noise that wanders over `period_s` (traffic varies by the minute, not the second)."""
    raw = rng.normal(0, 1, int(n / period_s) + 2)
    out: np.ndarray = np.clip(1 + scale * np.interp(np.arange(n) / period_s, np.arange(len(raw)), raw), 0.2, None)
    return out


def _daily_shape(rng: np.random.Generator, hours: np.ndarray) -> np.ndarray:
    """A day of one or two humps over a trough, peak 1: office hours, an evening bump, or both."""
    trough = rng.uniform(0.05, 0.4)
    shape = np.zeros_like(hours)
    for _ in range(int(rng.integers(1, 3))):
        centre, width = rng.uniform(9, 21), rng.uniform(1.5, 4.5)
        d = np.minimum(np.abs(hours - centre), 24 - np.abs(hours - centre))  # wraps around midnight
        shape = np.maximum(shape, np.exp(-(d**2) / (2 * width**2)))
    return trough + (1 - trough) * shape


def _grid(days: float) -> tuple[int, np.ndarray]:
    n = int(days * 86400)
    return n, np.arange(n) / 3600.0


def diurnal(rng: np.random.Generator, days: float, peak_rps: float) -> Trace:
    """The same day again and again (a periodic trace), with minute-scale noise."""
    n, hours = _grid(days)
    noise = rng.uniform(0.03, 0.12)
    rps = peak_rps * _daily_shape(rng, hours % 24) * _slow_noise(rng, n, noise)
    return Trace("diurnal", MONDAY, 1.0, rps, f"diurnal, {noise:.0%} noise, peak {peak_rps:.0f} rps")


def weekly(rng: np.random.Generator, days: float, peak_rps: float) -> Trace:
    """From a Friday: weekdays at full level, the weekend at a fraction of it."""
    n, hours = _grid(days)
    weekend = rng.uniform(0.2, 0.7)
    day = (hours // 24).astype(int)
    level = np.where((FRIDAY.weekday() + day) % 7 >= 5, weekend, 1.0)
    rps = peak_rps * level * _daily_shape(rng, hours % 24) * _slow_noise(rng, n, 0.05)
    return Trace("weekly", FRIDAY, 1.0, rps, f"weekly from a Friday, weekend at {weekend:.0%}")


def on_off(rng: np.random.Generator, days: float, peak_rps: float) -> Trace:
    """Markov-modulated bursts: on for tens of seconds, off for minutes (exponential holding times)."""
    n, _ = _grid(days)
    on_mean, off_mean = rng.uniform(20, 90), rng.uniform(45, 600)
    off_level = rng.uniform(0.0, 0.1)
    rps = np.empty(n)
    t, on = 0, bool(rng.integers(0, 2))
    while t < n:
        length = max(1, int(rng.exponential(on_mean if on else off_mean)))
        rps[t : t + length] = peak_rps * (rng.uniform(0.6, 1.0) if on else off_level)
        t, on = t + length, not on
    desc = f"on/off bursts: on ~{on_mean:.0f} s, off ~{off_mean:.0f} s, {off_level:.0%} between"
    return Trace("on-off", MONDAY, 1.0, rps, desc)


def flash_crowd(rng: np.random.Generator, days: float, peak_rps: float) -> Trace:
    """A quiet diurnal base with flash crowds: a rise of seconds to minutes, an exponential ebb."""
    n, hours = _grid(days)
    base = rng.uniform(0.08, 0.3)
    rps = peak_rps * base * _daily_shape(rng, hours % 24) * _slow_noise(rng, n, 0.05)
    t = np.arange(n, dtype=float)
    crowds = int(rng.integers(2, 7) * max(days, 1))
    for at in rng.uniform(0, n, crowds):
        rise, decay = rng.uniform(5, 120), rng.uniform(300, 2400)
        height = peak_rps * rng.uniform(0.5, 1.0)
        up = np.clip((t - at) / rise, 0, 1)
        rps += height * up * np.exp(-np.clip(t - at - rise, 0, None) / decay)
    return Trace("flash-crowd", MONDAY, 1.0, np.minimum(rps, 1.3 * peak_rps), f"{crowds} flash crowds on a quiet base")


def slow_ramp(rng: np.random.Generator, days: float, peak_rps: float) -> Trace:
    """A launch or a migration: the level climbs over hours, holds, and (sometimes) falls back."""
    n, hours = _grid(days)
    lo, start, climb = rng.uniform(0.05, 0.3), rng.uniform(1, 8), rng.uniform(2, 10)
    level = lo + (1 - lo) * np.clip((hours - start) / climb, 0, 1)
    if rng.random() < 0.5:
        fall = start + climb + rng.uniform(2, 6)
        level -= (1 - lo) * np.clip((hours - fall) / rng.uniform(1, 6), 0, 1)
    rps = peak_rps * level * _slow_noise(rng, n, 0.06)
    return Trace("slow-ramp", MONDAY, 1.0, rps, f"ramp from {lo:.0%} over {climb:.1f} h from {start:.1f} h")


def mix_shift(rng: np.random.Generator, days: float, peak_rps: float) -> Trace:
    """The request mix changes: for hours, requests are 1.5-3x longer (paragraphs, not replies), so
    the same rate needs more GPU; the rate itself follows the day."""
    n, hours = _grid(days)
    heavy, at, lasting = rng.uniform(1.5, 3.0), rng.uniform(2, 16), rng.uniform(2, 8)
    cost = np.where((hours >= at) & (hours < at + lasting), heavy, 1.0)
    cost = np.convolve(cost, np.ones(300) / 300, mode="same")  # the shift takes minutes
    cost[:150], cost[-150:] = cost[150], cost[-151]
    rate = _daily_shape(rng, hours % 24) * _slow_noise(rng, n, 0.05)
    rps = peak_rps * rate / float(np.max(rate * cost))  # the peak of work, not of requests, is the scale
    desc = f"request-mix shift: {heavy:.1f}x longer requests from {at:.1f} h for {lasting:.1f} h"
    return Trace("mix-shift", MONDAY, 1.0, rps, desc, cost=np.maximum(cost, 1.0))


def outages(rng: np.random.Generator, days: float, peak_rps: float) -> Trace:
    """A diurnal trace whose metrics go missing a few times a day, for 30 s to 20 min each."""
    base = diurnal(rng, days, peak_rps)
    n = len(base.rps)
    up = np.ones(n, dtype=bool)
    count = int(rng.integers(2, 7) * max(days, 1))
    for at, length in zip(rng.uniform(0, n, count), rng.uniform(30, 1200, count), strict=True):
        up[int(at) : int(at + length)] = False
    return Trace("outages", base.start, 1.0, base.rps, f"diurnal with {count} metrics outages", up)


TRACE_KINDS: dict[str, Generator] = {
    "on-off": on_off,
    "diurnal": diurnal,
    "flash-crowd": flash_crowd,
    "slow-ramp": slow_ramp,
    "mix-shift": mix_shift,
    "outages": outages,
    "weekly": weekly,
}
PERIODIC = frozenset({"diurnal"})  # the same day repeats: day 2 can be learnt from day 1


# --- manifests ----------------------------------------------------------------------------------


def _duration(seconds: float) -> str:
    return f"{int(seconds // 60)}m" if seconds % 60 == 0 else f"{int(seconds)}s"


def seed_rules(rng: np.random.Generator) -> list[dict[str, Any]]:
    """The seed documents' rules with other numbers: GPU above X % for N min (down below Y %), and
    often a queue rule, sometimes a latency rule."""
    up = int(rng.integers(60, 91))
    rules: list[dict[str, Any]] = [
        {
            "name": "gpu",
            "type": "gpuUtilization",
            "scaleUpAbove": up,
            "sustainFor": _duration(60 * int(rng.choice([1, 2, 3, 5]))),
            "scaleDownBelow": int(rng.integers(max(10, up - 45), up - 14)),
        }
    ]
    if rng.random() < 0.6:
        queue = {"name": "queue", "type": "queueLength", "scaleUpAbove": int(rng.integers(5, 31))}
        rules.append({**queue, "sustainFor": _duration(60 * int(rng.choice([1, 2])))})
    if rng.random() < 0.3:
        rules.append({"name": "latency", "type": "latencyP95", "scaleUpAbove": float(rng.choice([1.0, 1.5, 2.0]))})
    return rules


def keda_habit(rng: np.random.Generator) -> list[dict[str, Any]]:
    """What a KEDA/HPA user writes: proportional targets on GPU percent and queue per replica."""
    rules: list[dict[str, Any]] = [{"name": "gpu", "type": "gpuUtilization", "target": int(rng.integers(50, 86))}]
    if rng.random() < 0.5:
        rules.append({"name": "queue", "type": "queueLength", "target": int(rng.integers(2, 11))})
    if rng.random() < 0.25:
        rules.append({"name": "latency", "type": "latencyP95", "target": float(rng.choice([1.0, 1.5, 2.0]))})
    return rules


def cron_floor(rng: np.random.Generator, peak_replicas: int) -> list[dict[str, Any]]:
    """One or two daily (or weekday) windows with a floor near the peak's count."""
    out = []
    for k in range(int(rng.integers(1, 3))):
        days = "1-5" if rng.random() < 0.4 else "*"
        out.append(
            {
                "name": f"window-{k}",
                "cron": f"0 {int(rng.integers(6, 19))} * * {days}",
                "duration": f"{int(rng.integers(2, 9))}h",
                "prewarm": f"{int(rng.choice([0, 5, 10, 15]))}m",
                "minReplicas": max(1, round(peak_replicas * rng.uniform(0.3, 1.0))),
            }
        )
    return out


def scale_down(rng: np.random.Generator) -> dict[str, Any]:
    """A scale-down section as users tune it: a window, a step, sometimes a cooldown."""
    return {
        "stabilizationWindow": _duration(60 * int(rng.choice([1, 2, 5, 10, 15]))),
        "maxStepPods": int(rng.choice([1, 2, 4])),
        "cooldown": str(rng.choice(["0s", "30s", "1m"])),
    }


MANIFEST_KINDS = ("minimal", "seed-rules", "keda-habit", "cron-floor", "scale-down", "mixed")


def manifest(rng: np.random.Generator, kind: str, peak_replicas: int, name: str) -> dict[str, Any]:
    """A TTSDeployment of `kind` (MANIFEST_KINDS) for a load whose peak needs `peak_replicas`; max is
    set with the margin a user would give (1.2-2x the peak), min 1-3."""
    low = int(rng.choice([1, 1, 2, 3]))
    high = max(low + 2, math.ceil(peak_replicas * rng.uniform(1.2, 2.0)) + 1)
    scaling: dict[str, Any] = {"interval": str(rng.choice(["5s", "10s", "15s", "30s"]))}
    if kind in ("seed-rules", "scale-down", "mixed"):
        scaling["triggers"] = seed_rules(rng)
    elif kind == "keda-habit":
        scaling["triggers"] = keda_habit(rng)
    if kind in ("cron-floor", "mixed"):
        scaling["schedules"] = cron_floor(rng, peak_replicas)
    if kind in ("scale-down", "mixed"):
        scaling["scaleDown"] = scale_down(rng)
    spec: dict[str, Any] = {
        "model": {"image": "ghcr.io/voxscale/inference:0.1.0", "maxBatchSize": int(rng.choice([8, 8, 16]))},
        "replicas": {"min": low, "max": high},
    }
    if kind != "minimal":
        spec["scaling"] = scaling
    return {"apiVersion": "voxscale.io/v1alpha1", "kind": "TTSDeployment", "metadata": {"name": name}, "spec": spec}


# --- the generalization bench's pairs -------------------------------------------------------------
SEED = 21  # issue 21; committed, never re-drawn
COLD_STARTS = (30.0, 45.0, 60.0, 90.0, 120.0)
TWO_DAYS = frozenset({"diurnal", "weekly", "outages"})  # daily traces: day 2 is learnt from day 1 (or is a weekend)


@dataclass(frozen=True)
class Pair:
    index: int
    trace_kind: str
    manifest_kind: str
    days: float
    seed: int = SEED  # another seed draws a held-out set of the same kinds


def pairs(count: int, days: float | None, seed: int = SEED) -> list[Pair]:
    """Pair i: trace kind t = i mod 7, manifest kind (t + i // 7) mod 6: every 42 pairs meet every
    combination once, and any run of 7 pairs has every trace kind and 6 manifest kinds."""
    kinds, manifests = list(TRACE_KINDS), MANIFEST_KINDS
    out = []
    for i in range(count):
        t = i % len(kinds)
        tk, mk = kinds[t], manifests[(t + i // len(kinds)) % len(manifests)]
        out.append(Pair(i, tk, mk, days if days is not None else (2.0 if tk in TWO_DAYS else 1.0), seed))
    return out


def build(pair: Pair) -> tuple[Trace, dict[str, Any], CapacityModel]:
    """(trace, defaulted manifest, capacity) of a pair, all drawn from (pair.seed, index)."""
    rng = np.random.default_rng([pair.seed, pair.index])
    peak_replicas = int(rng.integers(2, 21))
    cold = float(rng.choice(COLD_STARTS))
    doc = manifest(rng, pair.manifest_kind, peak_replicas, f"pair-{pair.index}")
    ttsd = checked_manifest(doc)
    capacity = capacity_from_manifest(ttsd, cold_start_seconds=cold)
    peak_rps = peak_replicas * capacity.rps_per_replica * BUSY
    trace = TRACE_KINDS[pair.trace_kind](rng, pair.days, peak_rps)
    return trace, ttsd, capacity
