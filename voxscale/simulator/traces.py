"""Traffic traces: a CSV a user brings, or a built-in scenario from the seed documents.

A trace is requests per second at a fixed step, and optionally whether metrics were up at each step.
A CSV has a header naming its columns: `timestamp`, the rate as `rps` or `requests_per_second`, and
optionally `metrics_up` (1, or 0 during a metrics outage); other columns (mean_chars, ...) are ignored.
Timestamps are seconds (or ISO-8601) and must increase. Every error names the file:line and field.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
import zoneinfo
from collections.abc import Callable, Iterator
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
    # Per step, False during a metrics outage (an autoscaler's queries come back empty); None: always up.
    metrics_up: np.ndarray | None = None
    # Per step, the request mix: a request's service time over the capacity model's (1: the model's;
    # 2: requests twice as long, as when replies turn into paragraphs). None: always 1.
    cost: np.ndarray | None = None

    def __post_init__(self) -> None:
        for name in ("metrics_up", "cost"):
            values = getattr(self, name)
            if values is not None and values.shape != self.rps.shape:
                raise ValueError(f"{name} has {values.shape} steps, rps {self.rps.shape}: they must match")

    @property
    def work(self) -> np.ndarray:
        """Load in requests of the capacity model's size per second: rps x cost."""
        return self.rps if self.cost is None else self.rps * self.cost

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


# Accepted names of the rate column, and the optional outage column (1: metrics up, 0: an outage).
RATE_COLUMNS = ("rps", "requests_per_second")
METRICS_UP_COLUMN = "metrics_up"
_HEADER_HELP = "a header `timestamp,rps` (or `timestamp,requests_per_second`), optionally with `metrics_up`"


@dataclass(frozen=True)
class _Columns:
    """Where each field sits in a row, found by name so extra columns (mean_chars, ...) are ignored."""

    timestamp: int
    rate: int
    rate_name: str
    metrics_up: int | None

    @property
    def needed(self) -> int:
        return max(self.timestamp, self.rate, -1 if self.metrics_up is None else self.metrics_up) + 1


def _columns(header: list[str], where: str) -> _Columns:
    cols = [h.strip().lower() for h in header]
    rate = next((c for c in RATE_COLUMNS if c in cols), None)
    if "timestamp" not in cols or rate is None:
        raise TraceError(where, f"expected {_HEADER_HELP}; got {','.join(header)!r}")
    up = cols.index(METRICS_UP_COLUMN) if METRICS_UP_COLUMN in cols else None
    return _Columns(cols.index("timestamp"), cols.index(rate), rate, up)


def _parse_rate(text: str, where: str) -> float:
    try:
        r = float(text)
    except ValueError:
        raise TraceError(where, f"{text!r} is not a number") from None
    if not math.isfinite(r) or r < 0:
        raise TraceError(where, f"must be a finite number >= 0, got {text!r}")
    return r


def _parse_up(text: str, where: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true"):
        return True
    if value in ("0", "false"):
        return False
    raise TraceError(where, f"{text!r} is not 1 (metrics up) or 0 (metrics outage)")


def _rows(path: Path, expected: str) -> Iterator[tuple[str, list[str]]]:
    """(where, fields) of a CSV file's header, then of each data row (blank rows skipped), `where`
    being path:line for error messages; an empty file is an error that says what was `expected`.
    The one CSV prologue of both readers: a trace's rows and a request log's."""
    with path.open(newline="") as fh:
        reader = csv.reader(fh)
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{path}:1", f"empty file; expected {expected}")
        yield f"{path}:1", header
        for lineno, row in enumerate(reader, start=2):
            if row and any(c.strip() for c in row):
                yield f"{path}:{lineno}", row


def _enough(where: str, row: list[str], needed: int) -> None:
    """A row shorter than the header's columns say is an error where it stands."""
    if len(row) < needed:
        raise TraceError(where, f"expected at least {needed} fields as in the header, got {len(row)}")


def _read_rows(path: Path) -> tuple[list[float], list[float], list[bool] | None]:
    """(timestamps, rates, metrics-up flags or None) of every data row, each checked where it stands."""
    times: list[float] = []
    rates: list[float] = []
    ups: list[bool] = []
    rows = _rows(path, _HEADER_HELP)
    where, header = next(rows)
    cols = _columns(header, where)
    for where, row in rows:
        _enough(where, row, cols.needed)
        t = _parse_time(row[cols.timestamp].strip(), f"{where}: field timestamp")
        if times and t <= times[-1]:
            raise TraceError(f"{where}: field timestamp", "timestamps must strictly increase")
        times.append(t)
        rates.append(_parse_rate(row[cols.rate].strip(), f"{where}: field {cols.rate_name}"))
        if cols.metrics_up is not None:
            ups.append(_parse_up(row[cols.metrics_up], f"{where}: field {METRICS_UP_COLUMN}"))
    return times, rates, (ups if cols.metrics_up is not None else None)


def load_csv(path: Path, step_seconds: float = 1.0) -> Trace:
    """Read a CSV trace and resample it to `step_seconds` (each row holds until the next one)."""
    if not path.exists():
        raise TraceError(str(path), "no such file")
    times, rates, ups = _read_rows(path)
    if len(times) < 2:
        raise TraceError(str(path), "need at least 2 data rows")
    grid = np.arange(times[0], times[-1], step_seconds)
    idx = np.searchsorted(np.asarray(times), grid, side="right") - 1
    start = dt.datetime.fromtimestamp(times[0], dt.UTC) if times[0] > 1e9 else dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    up = None if ups is None else np.asarray(ups, dtype=bool)[idx]
    return Trace(path.stem, start, step_seconds, np.asarray(rates)[idx], f"CSV trace {path}", up)


# --- per-request logs ----------------------------------------------------------------------------
# Accepted names of a request log's optional size column: input characters or seconds of audio.
SIZE_COLUMNS = ("chars", "characters", "input_chars", "audio_seconds")
_LOG_HELP = "a header with `timestamp` and optionally one size column (chars or audio_seconds)"


def _log_columns(header: list[str], where: str) -> tuple[int, int | None, str | None]:
    """(timestamp column, size column or None, its name) of a request log's header."""
    cols = [h.strip().lower() for h in header]
    if "timestamp" not in cols:
        raise TraceError(where, f"expected {_LOG_HELP}; got {','.join(header)!r}")
    size = next((c for c in SIZE_COLUMNS if c in cols), None)
    return cols.index("timestamp"), (cols.index(size) if size else None), size


def _parse_size(text: str, where: str) -> float:
    try:
        size = float(text)
    except ValueError:
        raise TraceError(where, f"{text!r} is not a number; give the request's size, or drop the column") from None
    if not math.isfinite(size) or size <= 0:
        raise TraceError(
            where,
            f"must be a finite number > 0, got {text!r}; drop requests with no text (malformed ones are not demand)",
        )
    return size


def _read_requests(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """(arrival times, sizes or None) of every request in the log, each row checked where it stands."""
    times: list[float] = []
    sizes: list[float] = []
    rows = _rows(path, _LOG_HELP)
    where, header = next(rows)
    ts, size, size_name = _log_columns(header, where)
    needed = max(ts, -1 if size is None else size) + 1
    for where, row in rows:
        _enough(where, row, needed)
        times.append(_parse_time(row[ts].strip(), f"{where}: field timestamp"))
        if size is not None:
            sizes.append(_parse_size(row[size].strip(), f"{where}: field {size_name}"))
    return np.asarray(times), (np.asarray(sizes) if size is not None else None)


def load_requests(path: Path, step_seconds: float = 1.0) -> Trace:
    """A per-request log (an access log's timestamp, optionally each request's size) binned into a
    trace at `step_seconds`. With a size column each step's requests cost their mean size over the
    log's mean (Trace.cost): a request's service time grows with its size, and the log's mean
    request takes the capacity model's service time. Rows may come in any order (several workers
    write one log); they are sorted."""
    if not path.exists():
        raise TraceError(str(path), "no such file")
    times, sizes = _read_requests(path)
    if len(times) < 2:
        raise TraceError(str(path), "need at least 2 requests")
    order = np.argsort(times, kind="stable")
    times = times[order]
    if times[-1] - times[0] < step_seconds:
        raise TraceError(str(path), f"the requests span less than one step ({step_seconds:g} s); pass a smaller --step")
    origin = math.floor(times[0] / step_seconds) * step_seconds  # whole steps, as a log's seconds are
    bins = ((times - origin) // step_seconds).astype(np.int64)
    counts = np.bincount(bins)
    cost = None
    if sizes is not None:
        sizes = sizes[order]
        total = np.bincount(bins, weights=sizes)
        mean = np.divide(total, counts, out=np.full(len(counts), float(np.mean(sizes))), where=counts > 0)
        cost = mean / float(np.mean(sizes))
    start = dt.datetime.fromtimestamp(origin, dt.UTC) if origin > 1e9 else dt.datetime(2026, 1, 5, tzinfo=dt.UTC)
    desc = f"request log {path}: {len(times)} requests" + (" with sizes" if sizes is not None else "")
    return Trace(path.stem, start, step_seconds, counts / step_seconds, desc, cost=cost)


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


def _local_clock(start: dt.datetime, n: int, step_seconds: float) -> tuple[np.ndarray, np.ndarray]:
    """(local hour of day, local day index from the start) per step, following the start's timezone
    through DST changes, so a pattern written in local time moves by an hour in UTC when the clocks do."""
    utc = start.timestamp() + np.arange(n) * step_seconds
    quarter = 900.0  # offsets change on quarter-hour boundaries in every IANA zone
    first = math.floor(utc[0] / quarter)
    buckets = (np.floor(utc / quarter) - first).astype(np.int64)
    tz = start.tzinfo
    offsets = np.array(
        [
            (dt.datetime.fromtimestamp((first + k) * quarter, tz).utcoffset() or dt.timedelta(0)).total_seconds()
            for k in range(int(buckets[-1]) + 1)
        ]
    )
    local = utc + offsets[buckets]
    day = np.floor(local / 86400) - math.floor(local[0] / 86400)
    return (local / 3600) % 24, day.astype(np.int64)


def _daily_load(local_hour: np.ndarray, day_rps: float, noise: np.ndarray) -> np.ndarray:
    """Night at ~15 % of the day level; a sharp 3x morning peak from 08:00 (a ~2-minute rise) that
    ebbs around 11:00 over ~30 minutes; slow multiplicative noise."""
    awake = _smooth_step(local_hour, 6.5, 0.4) * (1 - _smooth_step(local_hour, 23.0, 0.4))
    peak = _smooth_step(local_hour, 8.0 + 1 / 60, 1 / 60) * (1 - _smooth_step(local_hour, 11.0, 0.25))
    result: np.ndarray = day_rps * (0.15 + 0.85 * awake) * (1 + 2.0 * peak) * noise
    return result


def _within(local_hour: np.ndarray, windows: list[tuple[int, int]]) -> np.ndarray:
    """Steps inside any [start, end) window, given in whole seconds of the local day."""
    second = np.round(local_hour * 3600, 3)  # exact whole seconds despite the float hours
    inside = np.zeros(local_hour.shape, dtype=bool)
    for lo, hi in windows:
        inside |= (second >= lo) & (second < hi)
    return inside


# When the clocks in Berlin go forward (2026-03-29 02:00 -> 03:00 local).
_BERLIN = zoneinfo.ZoneInfo("Europe/Berlin")
_DST_START = dt.datetime(2026, 3, 28, tzinfo=_BERLIN)


def daily_dst(days: float = 3.0, day_rps: float = 50.0, step_seconds: float = 1.0) -> Trace:
    """A daily pattern in Europe/Berlin local time across the DST change of 2026-03-29, with an
    unannounced 8x burst on the last day at 05:10 local (a batch job at night): tests that schedules
    and learnt daily patterns follow local time, and how each autoscaler meets a burst nobody
    announced, within the fleet's reach (~60 rps; the morning peak is ~150)."""
    n = int(days * 86400 / step_seconds)
    hour, day = _local_clock(_DST_START, n, step_seconds)
    rps = _daily_load(hour, day_rps, _noise(n, 4, 0.05))
    last_day = max(0, math.ceil(days) - 1)
    # 05:10 local, a ~20 s rise to 8x the level of the moment, ~15 minutes, a ~2-minute fall.
    burst = _smooth_step(hour, 5 + 10 / 60, 10 / 3600) * (1 - _smooth_step(hour, 5 + 25 / 60, 1 / 60))
    rps = rps * (1 + 7.0 * burst * (day == last_day))
    return Trace(
        "daily-dst",
        _DST_START.astimezone(dt.UTC),
        step_seconds,
        np.clip(rps, 0, None),
        f"daily pattern in Europe/Berlin across the DST change of 2026-03-29 ({days:g} days): ~{day_rps:g} rps by "
        f"day, 3x from 08:00 local for ~3 h; an unannounced 8x burst at 05:10 local on day {last_day + 1}",
    )


# Metrics outages, every day (seconds of the day): 3 min centred on the morning ramp (08:01), 5 min as
# the morning peak ebbs (~11:00), 20 min at night.
OUTAGES = [
    (7 * 3600 + 59 * 60 + 30, 8 * 3600 + 2 * 60 + 30),
    (10 * 3600 + 58 * 60, 11 * 3600 + 3 * 60),
    (3 * 3600, 3 * 3600 + 20 * 60),
]


def daily_outages(days: float = 3.0, day_rps: float = 50.0, step_seconds: float = 1.0) -> Trace:
    """The same kind of daily pattern (UTC) with metrics outages every day: 3 min in the middle of
    the morning ramp, 5 min as the morning peak ebbs, 20 min at night. Tests what an autoscaler does
    when its queries come back empty, rising, falling and quiet."""
    n = int(days * 86400 / step_seconds)
    hour, _ = _local_clock(_MONDAY, n, step_seconds)
    rps = _daily_load(hour, day_rps, _noise(n, 5, 0.05))
    return Trace(
        "daily-outages",
        _MONDAY,
        step_seconds,
        np.clip(rps, 0, None),
        f"daily pattern (UTC, {days:g} days), ~{day_rps:g} rps by day, 3x from 08:00 for ~3 h; metrics outages "
        "every day: 3 min mid-ramp at 08:00, 5 min as the peak ebbs at 11:00, 20 min at 03:00",
        ~_within(hour, OUTAGES),
    )


SCENARIOS: dict[str, Callable[..., Trace]] = {
    "education": education,
    "game-studio": game_studio,
    "course-launch": course_launch,
    "daily-dst": daily_dst,
    "daily-outages": daily_outages,
}

# Scenarios that take `days` (course-launch takes `hours`).
MULTI_DAY = frozenset({"education", "game-studio", "daily-dst", "daily-outages"})

# The example manifest each scenario is meant for (examples/<file>).
SCENARIO_MANIFESTS = {
    "education": "education-morning-peak.yaml",
    "game-studio": "game-studio-day-night.yaml",
    "course-launch": "course-launch-burst.yaml",
    "daily-dst": "daily-pattern.yaml",
    "daily-outages": "daily-pattern.yaml",
}
