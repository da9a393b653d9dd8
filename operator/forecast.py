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
import functools
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


def _shift(rps: np.ndarray, today: Span, past: tuple[Span, ...]) -> int:
    """How far a past day's pattern has moved against today's, as an index into SHIFTS: 0 (none), or
    an hour either way when today's last hours fit that clearly better (a DST change the configured
    timezone does not know about). `past` holds the window before the day's same local time at each
    of SHIFTS."""
    now = _slice(rps, today)
    fits = {k: _fit(now, _slice(rps, span)) for k, span in enumerate(past)}
    base = fits[0]
    scored = {k: f for k, f in fits.items() if f is not None}
    if base is None or not scored:
        return 0
    best = min(scored, key=lambda k: scored[k])
    return best if scored[best] < SHIFT_GAIN * base else 0


def forecast(
    history: RateHistory,
    now: dt.datetime,
    horizon: dt.timedelta,
    tz: zoneinfo.ZoneInfo,
    min_history: dt.timedelta = DAY,
    method: Method = DEFAULT_METHOD,
) -> Forecast | NoForecast:
    """Peak demand expected in [now, now + horizon], or why it cannot be forecast.

    `now` matters only through which samples each window reads, and those change once a step (a
    minute) while the engine ticks every few seconds: the windows are turned into sample indices
    here and the arithmetic on them is memoised on those indices and the samples' bytes (_forecast)."""
    zone = tz if method.local_time else zoneinfo.ZoneInfo("UTC")
    today, level = _spans(history, now, ((-MATCH_WINDOW, ZERO), (-LEVEL_WINDOW, ZERO)))
    around = tuple((s - MATCH_WINDOW, s) for s in SHIFTS)  # per shift: the stretch matched with today,
    around += tuple((s - JITTER, s + horizon + JITTER) for s in SHIFTS)  # the one the peak is taken from,
    around += tuple((s - LEVEL_WINDOW, s) for s in SHIFTS)  # and the one its level is taken from
    days = tuple(_spans(history, _local_days_ago(now, d, zone), around) for d in range(1, method.days + 1))
    key = _Windows(history.step_seconds, horizon, min_history, method, today, level, days)
    return _forecast(key, _bytes(history.rps))


ZERO = dt.timedelta(0)
SHIFTS = (ZERO, -SHIFT, SHIFT)  # the shifts a past day's pattern is tried at, none first
Span = tuple[int, int]  # [i, j) sample indices of a window
_US = dt.timedelta(microseconds=1)


@dataclass(frozen=True)
class _Windows:
    """Everything a forecast reads besides the samples themselves: its memo key."""

    step_seconds: float
    horizon: dt.timedelta
    min_history: dt.timedelta
    method: Method
    today: Span  # the MATCH_WINDOW up to now
    level: Span  # the LEVEL_WINDOW up to now
    # Per past day, per shift in SHIFTS: its match windows, then its peak windows, then its level windows.
    days: tuple[tuple[Span, ...], ...]


def _spans(
    history: RateHistory, at: dt.datetime, windows: tuple[tuple[dt.timedelta, dt.timedelta], ...]
) -> tuple[Span, ...]:
    """The sample indices RateHistory.window(at + a, at + b) reads, for each (a, b) in `windows`;
    in whole microseconds, as timedelta arithmetic is, so the indices are the very same."""
    base = (at - history.start) // _US
    step, n = history.step_seconds, len(history.rps)
    out = []
    for a, b in windows:
        i = max(0, math.floor((base + a // _US) / 10**6 / step))
        j = min(n, math.ceil((base + b // _US) / 10**6 / step))
        out.append((i, j) if j > i else (0, 0))
    return tuple(out)


@functools.lru_cache(maxsize=32)  # a few TTSDeployments' worth; each key holds its history's bytes
def _forecast(key: _Windows, samples: bytes) -> Forecast | NoForecast:
    """forecast() on sample indices: a pure function of the windows and the samples' values."""
    rps = np.frombuffer(samples)
    covered = dt.timedelta(seconds=float(np.count_nonzero(~np.isnan(rps))) * key.step_seconds)
    if covered < key.min_history:
        have = f"{covered.total_seconds() / 3600:.1f} h"
        return NoForecast(f"{have} of arrival history, needs {_hours(key.min_history)}", covered)
    level_samples = int(LEVEL_WINDOW.total_seconds() // key.step_seconds)
    recent = _mean(_slice(rps, key.level), level_samples)
    profiles: list[tuple[float, float, dt.timedelta]] = []  # (peak, level, shift) per usable day
    lo, hi = key.method.level_clamp
    for day in key.days:
        k = _shift(rps, key.today, day[:3]) if key.method.detect_shift else 0
        shift = SHIFTS[k]
        peak = _peak(_slice(rps, day[3 + k]))
        base = _mean(_slice(rps, day[6 + k]), level_samples)
        if peak is None:
            continue
        level = 1.0 if recent is None or not base else min(max(recent / base, lo), hi)
        profiles.append((peak * level, level, shift))
    if not profiles:
        return NoForecast("no arrival history at this time of day in the last days", covered)
    peak, level, shift = max(profiles, key=lambda p: p[0])
    days = f"{len(profiles)} past day(s)"
    moved = f", pattern moved {shift.total_seconds() / 3600:+g} h" if shift else ""
    note = f"{peak:.3g} rps expected within {_minutes(key.horizon)} (same local time on {days} x{level:.2f}{moved})"
    return Forecast(peak, key.horizon, len(profiles), level, note)


def _slice(rps: np.ndarray, span: Span) -> np.ndarray:
    return rps[span[0] : span[1]]


def _bytes(rps: np.ndarray) -> bytes:
    """Samples as float64 bytes: a memo key that is their values, whoever holds the array."""
    return np.ascontiguousarray(rps, dtype=np.float64).tobytes()


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
    own recent traffic rather than a fixed utilisation target. The samples it reads change once a
    step, not once a tick: the arithmetic is memoised on their bytes (_growth).
    """
    rps = history.window(now - GROWTH_SPAN, now)
    ahead = max(1, math.ceil(horizon.total_seconds() / history.step_seconds))
    return _growth(_bytes(rps), ahead, history.step_seconds)


@functools.lru_cache(maxsize=64)
def _growth(samples: bytes, ahead: int, step_seconds: float) -> float | None:
    rps = np.frombuffer(samples)
    if len(rps) <= ahead + 10:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(rps[1:], ahead)
    base = rps[: len(windows)]
    busy_enough = GROWTH_MIN_ARRIVALS / step_seconds
    ok = ~np.isnan(base) & (base >= busy_enough) & ~np.isnan(windows).any(axis=1)
    if ok.sum() < 10:
        return None
    ratios = windows[ok].max(axis=1) / base[ok]
    return float(min(max(np.quantile(ratios, GROWTH_QUANTILE), 1.0), GROWTH_CAP))


WOBBLE_MIN_SAMPLES = 3  # samples of the recent span needed before its spread says anything
WOBBLE_CAP = 1.0  # a swing beyond doubling is a burst: overload answers it at once, no band holds for it


def wobble(
    history: RateHistory, now: dt.datetime, span: dt.timedelta, memory: dt.timedelta | None = None
) -> float | None:
    """How far demand swung within `span` with nothing else changing: the largest spread (highest /
    lowest - 1) of the history's samples in any `span` of the last `memory` (default: the last `span`
    alone), at most WOBBLE_CAP; None with too few samples.

    A scale-down the next swing of the same size undoes is a flap; the SLO model keeps its
    scale-downs out of the band this wide (antiflap.py's rebound). A steady load gives a narrow band,
    a noisy plateau a wide one: the headroom follows the noise actually seen. A memory longer than
    the span keeps the band through a calm spell of a load that swings every so often: a scale-down
    taken in the calm is undone by the next swing (the generalization bench's diurnal pairs flapped
    so, minutes apart, all afternoon).
    """
    rps = history.window(now - (memory or span), now)
    width = max(1, len(history.window(now - span, now)))  # the samples one span holds
    return _wobble(_bytes(rps), width)


@functools.lru_cache(maxsize=64)  # every tick asks for each trigger's band; the samples change once a step
def _wobble(samples: bytes, width: int) -> float | None:
    rps = np.frombuffer(samples)
    if len(rps) < width:
        rps = np.concatenate([np.full(width - len(rps), np.nan), rps])
    windows = np.lib.stride_tricks.sliding_window_view(rps, width)
    counted = np.count_nonzero(~np.isnan(windows), axis=1) >= WOBBLE_MIN_SAMPLES
    if not counted.any():
        return None
    windows = windows[counted]
    with np.errstate(invalid="ignore"):
        low, high = np.nanmin(windows, axis=1), np.nanmax(windows, axis=1)
    valid = low > 0
    if not valid.any():
        return None
    return min(float(np.max(high[valid] / low[valid])) - 1.0, WOBBLE_CAP)


BURST_MEMORY = dt.timedelta(hours=1)  # bursts this recent are expected again
BURST_RATIO = 1.5  # a rise within a pod start to this multiple of the rate before it is a burst, not drift
# Bursts seen in the memory before more are expected. 1: a crowd is often followed by another (on the
# generalization bench, 2 kept 3 points fewer pairs within the KEDA model's SLO share; 1 costs more GPU-h
# on flash crowds, bench/results/generalize.md).
BURST_RECURRENCE = 1


def burst(history: RateHistory, now: dt.datetime, horizon: dt.timedelta) -> float | None:
    """The largest rise of demand (requests/s) within `horizon` (a pod start) seen over the last
    BURST_MEMORY, counting only bursts (a rise to BURST_RATIO x the rate before it or more: a burst
    from idle counts, the drift of a ramp does not - `growth` covers that), once at least
    BURST_RECURRENCE separate bursts began there; None otherwise.

    A burst shorter than a pod start is over before capacity ordered for it is Ready: only capacity
    already there absorbs it. Traffic that came in bursts lately (on/off sources, a crowd that
    returns) is served with headroom for the rise it showed, for as long as such bursts keep coming;
    an hour without one gives the headroom back. Knative's KPA answers the same with a panic window
    after the fact; the HPA with its 5-minute scale-down window, which holds whatever the last burst
    left behind whether or not bursts recur."""
    rps = history.window(now - BURST_MEMORY, now)
    ahead = max(1, math.ceil(horizon.total_seconds() / history.step_seconds))
    return _burst(_bytes(rps), ahead)


@functools.lru_cache(maxsize=64)
def _burst(samples: bytes, ahead: int) -> float | None:
    rps = np.frombuffer(samples)
    if len(rps) <= ahead:
        return None
    windows = np.lib.stride_tricks.sliding_window_view(rps[1:], ahead)
    base = rps[: len(windows)]
    # A minute with no sample (an outage, no pod to count) is no evidence: neither a base nor a peak.
    seen = ~np.isnan(base) & ~np.isnan(windows).all(axis=1)
    if not seen.any():
        return None
    peaks = np.nanmax(windows[seen], axis=1)
    bursting = (peaks >= BURST_RATIO * base[seen]) & (peaks > 0)
    onsets = int(bursting[0]) + int(np.count_nonzero(bursting[1:] & ~bursting[:-1]))
    if onsets < BURST_RECURRENCE:
        return None
    return float((peaks - base[seen])[bursting].max())
