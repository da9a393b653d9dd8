"""One replica's capacity, learnt in two units of work: requests and input characters.

TTS cost grows with the length of what is read, and real request mixes vary 50x (a ten-word reply
against a paragraph). A capacity in requests per second, measured under one mix, is wrong under
another: measured while the requests were long, it stays low after they shorten, and the fleet
is sized for work that no longer arrives (it is then too idle to measure again, so the error never
corrects). Counted in characters, what a replica gets through per busy second barely moves with the
mix; the requests it can take now are that over the characters a request carries now.

Both are learnt from the same measurement (completed requests per busy second, taken under load,
times the characters per request arriving then), and each new measurement first scores what each
unit predicted for it: the unit with the smaller running error sizes the fleet. Characters win
ties, including before any score exists, because the failure they prevent is the one a wrong
requests figure cannot recover from; a server whose cost does not follow the text's length (a
fixed cost per request dominating) shows it at the next measurement and requests take over. The
decision says which unit it used. Without a character counter (Triton, a user's PromQL) it is
requests, as before.

Pure functions of the previous memory and this tick's readings, as the engine is.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import StrEnum

# Weight of a new measurement against what was learnt before (per unit).
SMOOTHING = 0.5
# Weight of a new prediction error against the running one.
ERROR_SMOOTHING = 0.3
# Requests take over only when their running error is lower by more than this (|log| units, ~5 %):
# under a steady mix both predict alike, and noise must not flip the unit.
UNIT_MARGIN = 0.05


class Unit(StrEnum):
    REQUESTS = "requests"
    CHARACTERS = "characters"


@dataclass(frozen=True)
class Learnt:
    """What is known of one replica's capacity (serialised in status.engine; a restart keeps it)."""

    rps: float | None = None  # requests per busy second, smoothed measurements
    chars: float | None = None  # characters per busy second, smoothed measurements
    # Running mean of |log(predicted / measured)| of each unit, scored at each new measurement.
    error_rps: float | None = None
    error_chars: float | None = None

    def unit(self) -> Unit:
        """The unit that predicts new measurements better (characters on a tie or before a score)."""
        if self.error_rps is None or self.error_chars is None:
            return Unit.CHARACTERS
        return Unit.REQUESTS if self.error_rps + UNIT_MARGIN < self.error_chars else Unit.CHARACTERS


@dataclass(frozen=True)
class Capacity:
    """Requests per second one replica serves now, and the unit whose learnt figure gave it."""

    rps: float
    unit: Unit


def _positive(x: float | None) -> float | None:
    """x where it is a usable rate (finite, > 0), else None."""
    return x if x is not None and math.isfinite(x) and x > 0 else None


def _smooth(old: float | None, new: float, weight: float) -> float:
    return new if old is None else weight * new + (1 - weight) * old


def _score(old: float | None, predicted: float | None, measured: float) -> float | None:
    """The running error of a unit whose learnt figure predicted `predicted` (None: it could not)."""
    if predicted is None:
        return old
    return _smooth(old, abs(math.log(predicted / measured)), ERROR_SMOOTHING)


def chars_per_request(arrivals: float | None, chars: float | None) -> float | None:
    """Mean input characters of the requests arriving over the window (None without both rates)."""
    a, c = _positive(arrivals), _positive(chars)
    return c / a if a is not None and c is not None else None


def learn(prev: Learnt, measured_rps: float | None, per_request: float | None) -> Learnt:
    """`prev` updated by this tick's measurement (requests per busy second under load, None when the
    pods were not busy enough) and the characters per request arriving now."""
    measured, k = _positive(measured_rps), _positive(per_request)
    if measured is None:
        return prev
    learnt_chars = _positive(prev.chars)
    return Learnt(
        rps=_smooth(prev.rps, measured, SMOOTHING),
        chars=_smooth(prev.chars, measured * k, SMOOTHING) if k is not None else prev.chars,
        error_rps=_score(prev.error_rps, _positive(prev.rps), measured),
        error_chars=_score(prev.error_chars, learnt_chars / k if learnt_chars and k else None, measured),
    )


def now(learnt: Learnt, per_request: float | None) -> Capacity | None:
    """The capacity to size with now: in the better unit where it can be read, else in requests;
    None before any measurement."""
    chars, k, rps = _positive(learnt.chars), _positive(per_request), _positive(learnt.rps)
    if learnt.unit() is Unit.CHARACTERS and chars is not None and k is not None:
        return Capacity(chars / k, Unit.CHARACTERS)
    return Capacity(rps, Unit.REQUESTS) if rps is not None else None
