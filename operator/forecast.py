"""Demand forecast from the arrival-rate history: the same local time on recent days, level-adjusted.

Pure: the operator feeds it a Prometheus `query_range` of the arrival rate, the simulator what it
has seen so far. Traffic of a TTS service follows its users' day (lessons at 08:00, players after
work), so day d ago is aligned on local wall-clock time in the deployment's timezone: 08:00 stays
08:00 across a DST change. Each day's profile over the look-ahead is scaled by how busy today has
been compared with that day (clamped, so one burst does not double tomorrow), and the highest of the
recent days' profiles is taken: under-forecasting costs latency, over-forecasting a little GPU time,
and the reactive SLO trigger covers what no history predicts. The method was chosen by measured
forecast error on the simulator's traces (bench/forecast_bench.py), not by fashion.
"""

from __future__ import annotations

import datetime as dt
import math
import zoneinfo
from dataclasses import dataclass

import numpy as np

DAY = dt.timedelta(days=1)
LEVEL_WINDOW = dt.timedelta(minutes=30)  # "how busy today has been": the last half hour
MATCH_WINDOW = dt.timedelta(hours=3)  # the stretch of today compared with past days to find a shift
SHIFT = dt.timedelta(hours=1)  # a pattern may move by an hour: a DST change in a timezone not configured
SHIFT_GAIN = 0.7  # a shifted day must fit today this much better (error ratio) before it is believed
JITTER = dt.timedelta(minutes=5)  # a peak may start a few minutes earlier than yesterday


@dataclass(frozen=True)
class Method:
    """The forecast's knobs; the defaults are the variant bench/forecast_bench.py measured best."""

    days: int = 2  # the most recent days; older ones add little to a daily pattern and lag a trend
    level_clamp: tuple[float, float] = (0.5, 1.5)  # (1, 1): no level adjustment
    detect_shift: bool = True
    local_time: bool = True  # False: align on UTC, ignoring the timezone


DEFAULT_METHOD = Method()


@dataclass(frozen=True)
class RateHistory:
    """Arrival rate (requests/s) at a regular step, oldest first; NaN where nothing was recorded."""

    start: dt.datetime
    step_seconds: float
    rps: np.ndarray

    @property
    def end(self) -> dt.datetime:
        return self.start + dt.timedelta(seconds=self.step_seconds * len(self.rps))

    @property
    def covered(self) -> dt.timedelta:
        """Time with data in it (gaps excluded)."""
        return dt.timedelta(seconds=float(np.count_nonzero(~np.isnan(self.rps))) * self.step_seconds)

    def window(self, since: dt.datetime, until: dt.datetime) -> np.ndarray:
        """The samples in [since, until) (possibly empty, NaN where missing)."""
        i = max(0, math.floor((since - self.start).total_seconds() / self.step_seconds))
        j = min(len(self.rps), math.ceil((until - self.start).total_seconds() / self.step_seconds))
        return self.rps[i:j] if j > i else self.rps[:0]


@dataclass(frozen=True)
class Forecast:
    """Forecast demand over the next `horizon`: the peak (requests/s) and where it came from."""

    peak_rps: float
    horizon: dt.timedelta
    days: int  # how many past days it rests on
    level: float  # today's busyness against those days
    note: str


@dataclass(frozen=True)
class NoForecast:
    """Why there is no forecast (too little history, no data at all)."""

    reason: str
    covered: dt.timedelta


def _local_days_ago(now: dt.datetime, days: int, tz: zoneinfo.ZoneInfo) -> dt.datetime:
    """The instant with the same local wall-clock time `days` days earlier (DST-aware)."""
    local = now.astimezone(tz)
    earlier = (local.replace(tzinfo=None) - days * DAY).replace(tzinfo=tz)
    return earlier.astimezone(dt.UTC)


def _mean(values: np.ndarray, expected: int = 0) -> float | None:
    """Mean of the samples present; None when fewer than half of `expected` are (a level from a few
    minutes of a new series is noise, not today's busyness)."""
    ok = values[~np.isnan(values)]
    return float(ok.mean()) if ok.size and ok.size >= expected / 2 else None


def _peak(values: np.ndarray) -> float | None:
    ok = values[~np.isnan(values)]
    return float(ok.max()) if ok.size else None


def _fit(today: np.ndarray, past: np.ndarray) -> float | None:
    """Relative mean absolute difference of two equally long stretches (None: too little data)."""
    n = min(len(today), len(past))
    a, b = today[len(today) - n :], past[len(past) - n :]
    ok = ~np.isnan(a) & ~np.isnan(b)
    if n == 0 or ok.sum() < n / 2:
        return None
    scale = max(float(a[ok].mean()), 1e-9)
    return float(np.abs(a[ok] - b[ok]).mean()) / scale


def _shift(history: RateHistory, now: dt.datetime, then: dt.datetime) -> dt.timedelta:
    """How far a past day's pattern has moved against today's: 0, or an hour either way when today's
    last hours fit that clearly better (a DST change the configured timezone does not know about)."""
    today = history.window(now - MATCH_WINDOW, now)
    fits = {s: _fit(today, history.window(then + s - MATCH_WINDOW, then + s)) for s in (dt.timedelta(0), -SHIFT, SHIFT)}
    base = fits[dt.timedelta(0)]
    scored = {s: f for s, f in fits.items() if f is not None}
    if base is None or not scored:
        return dt.timedelta(0)
    best = min(scored, key=lambda s: scored[s])
    return best if scored[best] < SHIFT_GAIN * base else dt.timedelta(0)


def forecast(
    history: RateHistory,
    now: dt.datetime,
    horizon: dt.timedelta,
    tz: zoneinfo.ZoneInfo,
    min_history: dt.timedelta = DAY,
    method: Method = DEFAULT_METHOD,
) -> Forecast | NoForecast:
    """Peak demand expected in [now, now + horizon], or why it cannot be forecast."""
    covered = history.covered
    if covered < min_history:
        have = f"{covered.total_seconds() / 3600:.1f} h"
        return NoForecast(f"{have} of arrival history, needs {_hours(min_history)}", covered)
    level_samples = int(LEVEL_WINDOW.total_seconds() // history.step_seconds)
    recent = _mean(history.window(now - LEVEL_WINDOW, now), level_samples)
    profiles: list[tuple[float, float, dt.timedelta]] = []  # (peak, level, shift) per usable day
    lo, hi = method.level_clamp
    zone = tz if method.local_time else zoneinfo.ZoneInfo("UTC")
    for d in range(1, method.days + 1):
        then = _local_days_ago(now, d, zone)
        shift = _shift(history, now, then) if method.detect_shift else dt.timedelta(0)
        then += shift
        peak = _peak(history.window(then - JITTER, then + horizon + JITTER))
        base = _mean(history.window(then - LEVEL_WINDOW, then), level_samples)
        if peak is None:
            continue
        level = 1.0 if recent is None or not base else min(max(recent / base, lo), hi)
        profiles.append((peak * level, level, shift))
    if not profiles:
        return NoForecast("no arrival history at this time of day in the last days", covered)
    peak, level, shift = max(profiles, key=lambda p: p[0])
    days = f"{len(profiles)} past day(s)"
    moved = f", pattern moved {shift.total_seconds() / 3600:+g} h" if shift else ""
    note = f"{peak:.3g} rps expected within {_minutes(horizon)} (same local time on {days} x{level:.2f}{moved})"
    return Forecast(peak, horizon, len(profiles), level, note)


def _hours(td: dt.timedelta) -> str:
    return f"{td.total_seconds() / 3600:g} h"


def _minutes(td: dt.timedelta) -> str:
    secs = td.total_seconds()
    return f"{secs / 60:.3g} min" if secs >= 60 else f"{secs:g} s"


GROWTH_SPAN = dt.timedelta(hours=6)
GROWTH_QUANTILE = 0.8
GROWTH_CAP = 1.5
# A sample counts towards growth only with this many arrivals behind it: the minute-to-minute wobble of
# a thin Poisson stream is not demand growth (the queueing model already allows for Poisson arrivals).
GROWTH_MIN_ARRIVALS = 1000


def growth(history: RateHistory, now: dt.datetime, horizon: dt.timedelta) -> float | None:
    """How much demand rises within `horizon` (a pod start) at worst, usually: the GROWTH_QUANTILE
    over the last hours of max(rate over the next `horizon`) / rate now, at least 1 and at most
    GROWTH_CAP; None without enough busy history to say.

    Capacity ordered now is Ready only after a pod start; sizing for today's demand alone leaves the
    fleet short whenever demand drifts up meanwhile. This is that drift, learnt from the service's
    own recent traffic rather than a fixed utilisation target.
    """
    rps = history.window(now - GROWTH_SPAN, now)
    ahead = max(1, math.ceil(horizon.total_seconds() / history.step_seconds))
    if len(rps) <= ahead + 10:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(rps[1:], ahead)
    base = rps[: len(windows)]
    busy_enough = GROWTH_MIN_ARRIVALS / history.step_seconds
    ok = ~np.isnan(base) & (base >= busy_enough) & ~np.isnan(windows).any(axis=1)
    if ok.sum() < 10:
        return None
    ratios = windows[ok].max(axis=1) / base[ok]
    return float(min(max(np.quantile(ratios, GROWTH_QUANTILE), 1.0), GROWTH_CAP))
