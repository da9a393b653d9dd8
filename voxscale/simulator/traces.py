"""Traffic traces: a CSV a user brings, or a built-in scenario from the seed documents.

A trace is requests per second at a fixed step. CSV rows are `timestamp,rps[,mean_chars]` with a
header; timestamps are seconds (or ISO-8601) and must increase. Every error names the line and field.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class TraceError(ValueError):
    def __init__(self, where: str, message: str) -> None:
        super().__init__(f"{where}: {message}")


@dataclass(frozen=True)
class Trace:
    name: str
    start: dt.datetime  # wall-clock time of the first step (schedules are evaluated against it)
    step_seconds: float
    rps: np.ndarray  # requests per second, one value per step
    description: str = ""

    @property
    def seconds(self) -> float:
        return len(self.rps) * self.step_seconds


def _parse_time(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise TraceError(where, f"timestamp {text!r} is neither seconds nor ISO-8601") from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=dt.UTC)
    return t.timestamp()


def load_csv(path: Path, step_seconds: float = 1.0) -> Trace:
    """Read a CSV trace and resample it to `step_seconds` (each row holds until the next one)."""
    if not path.exists():
        raise TraceError(str(path), "no such file")
    times: list[float] = []
    rates: list[float] = []
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{path}:1", "empty file; expected a header `timestamp,rps`")
        cols = [h.strip().lower() for h in header]
        if len(cols) < 2 or cols[0] != "timestamp" or cols[1] != "rps":
            raise TraceError(f"{path}:1", f"header must start with `timestamp,rps`, got {','.join(header)!r}")
        for lineno, row in enumerate(reader, start=2):
            if not row or all(not c.strip() for c in row):
                continue
            where = f"{path}:{lineno}"
            if len(row) < 2:
                raise TraceError(where, f"expected at least 2 fields (timestamp,rps), got {len(row)}")
            t = _parse_time(row[0].strip(), f"{where}: field timestamp")
            try:
                r = float(row[1])
            except ValueError:
                raise TraceError(f"{where}: field rps", f"{row[1]!r} is not a number") from None
            if not math.isfinite(r) or r < 0:
                raise TraceError(f"{where}: field rps", f"must be a finite number >= 0, got {row[1]!r}")
            if times and t <= times[-1]:
                raise TraceError(f"{where}: field timestamp", "timestamps must strictly increase")
            times.append(t)
            rates.append(r)
    if len(times) < 2:
        raise TraceError(str(path), "need at least 2 data rows")
    grid = np.arange(times[0], times[-1], step_seconds)
    idx = np.searchsorted(np.asarray(times), grid, side="right") - 1
    start = dt.datetime.fromtimestamp(times[0], dt.UTC) if times[0] > 1e9 else dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    return Trace(path.stem, start, step_seconds, np.asarray(rates)[idx], f"CSV trace {path}")


# --- built-in scenarios from the seed documents -------------------------------------------------
# Monday 2026-01-05 00:00 UTC: schedules in the example manifests are evaluated on real dates.
_MONDAY = dt.datetime(2026, 1, 5, tzinfo=dt.UTC)


def _smooth_step(x: np.ndarray, at: float, width: float) -> np.ndarray:
    result: np.ndarray = 0.5 * (1 + np.tanh((x - at) / width))
    return result


def _noise(n: int, seed: int, scale: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    # Slowly varying multiplicative noise (minutes), as real traffic has.
    raw = rng.normal(0, 1, n // 60 + 2)
    slow = np.interp(np.arange(n) / 60, np.arange(len(raw)), raw)
    result: np.ndarray = 1 + scale * slow
    return result


def education(days: int = 1, base_rps: float = 30.0, step_seconds: float = 1.0, tz_offset_hours: float = 8.0) -> Trace:
    """An education platform: traffic triples when lessons start at 08:00 local (UTC+8) for 4 hours."""
    n = int(days * 86400 / step_seconds)
    t = np.arange(n) * step_seconds
    local_hour = (t / 3600) % 24  # the trace starts at local midnight
    day = _smooth_step(local_hour, 7.0, 0.4) * (1 - _smooth_step(local_hour, 22.5, 0.4))  # awake hours
    peak = _smooth_step(local_hour, 8.0, 0.05) * (1 - _smooth_step(local_hour, 12.0, 0.3))
    rps = base_rps * (0.15 + 0.85 * day) * (1 + 2.0 * peak) * _noise(n, 1, 0.05)
    return Trace(
        "education",
        _MONDAY - dt.timedelta(hours=tz_offset_hours),
        step_seconds,
        np.clip(rps, 0, None),
        "education platform: 3x peak from 08:00 (UTC+8) for 4 h",
    )


def game_studio(days: int = 1, day_rps: float = 90.0, step_seconds: float = 1.0) -> Trace:
    """A game studio's NPC voices: busy 07:00-01:00 (Europe/Berlin in winter, UTC+1), quiet at night."""
    n = int(days * 86400 / step_seconds)
    t = np.arange(n) * step_seconds
    local_hour = (t / 3600) % 24  # the trace starts at local midnight (UTC+1)
    night = _smooth_step(local_hour, 1.0, 0.2) * (1 - _smooth_step(local_hour, 7.0, 0.2))
    evening = np.exp(-((local_hour - 20.5) ** 2) / 4)  # players after work
    rps = day_rps * (1 - 0.85 * night) * (1 + 0.6 * evening) * _noise(n, 2, 0.08)
    return Trace(
        "game-studio",
        _MONDAY - dt.timedelta(hours=1),
        step_seconds,
        np.clip(rps, 0, None),
        "game studio: day traffic with an evening bump, ~15 % of it at night (01:00-07:00)",
    )


def course_launch(
    hours: float = 3.0, base_rps: float = 5.0, burst_rps: float = 130.0, step_seconds: float = 1.0
) -> Trace:
    """A course launch: a quiet hour, then hundreds of learners at once, decaying over half an hour."""
    n = int(hours * 3600 / step_seconds)
    t = np.arange(n) * step_seconds
    at = 3600.0
    burst = np.where(t >= at, np.exp(-np.clip(t - at, 0, None) / 1200.0), 0.0)
    rps = base_rps + (burst_rps - base_rps) * burst
    rps = rps * _noise(n, 3, 0.05)
    return Trace(
        "course-launch",
        _MONDAY + dt.timedelta(hours=9),
        step_seconds,
        np.clip(rps, 0, None),
        f"course launch: {base_rps:g} rps, then a jump to {burst_rps:g} rps at 1 h decaying over ~30 min",
    )


SCENARIOS: dict[str, Callable[[], Trace]] = {
    "education": education,
    "game-studio": game_studio,
    "course-launch": course_launch,
}

# The example manifest each scenario is meant for (examples/<file>).
SCENARIO_MANIFESTS = {
    "education": "education-morning-peak.yaml",
    "game-studio": "game-studio-day-night.yaml",
    "course-launch": "course-launch-burst.yaml",
}
