"""Reversals: scale moves the fleet undid while the traffic stayed where it was (issue 21, item 2).

One definition for the simulator's results (`reversals` in `--json`), the operator's status and
metrics, and the tests: a move reverses the move before it when it goes the other way within
REVERSAL_WINDOW_S while the load (arrivals over the rate window) changed by less than
REVERSAL_TOLERANCE of the larger of the two. Such a pair is the autoscaler changing its mind, not the
traffic changing: a flap. Pure functions on plain data.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

REVERSAL_WINDOW_S = 600.0
REVERSAL_TOLERANCE = 0.2
# The operator says Flapping while this many reversals fall within the last FLAPPING_HORIZON_S.
FLAPPING_REVERSALS = 2
FLAPPING_HORIZON_S = 3600.0


@dataclass(frozen=True)
class Move:
    """One scale event: when (seconds), which way, the load then (None: not measured) and the rule
    that asked for it (empty where nobody names one, as in the simulator's baselines)."""

    t: float
    up: bool
    load: float | None
    rule: str = ""


def reversed_pairs(
    moves: Sequence[Move], window_s: float = REVERSAL_WINDOW_S, tolerance: float = REVERSAL_TOLERANCE
) -> list[tuple[Move, Move]]:
    """Each move that undoes the one before it within `window_s` while the load changed by less than
    `tolerance` of the larger load. A move whose load was not measured is never counted: without the
    load, a reversal cannot be told from traffic that turned."""
    return [
        (a, b)
        for a, b in itertools.pairwise(moves)
        if a.up != b.up
        and b.t - a.t <= window_s
        and a.load is not None
        and b.load is not None
        and abs(b.load - a.load) <= tolerance * max(a.load, b.load)
    ]


def count_reversals(
    moves: Sequence[Move], window_s: float = REVERSAL_WINDOW_S, tolerance: float = REVERSAL_TOLERANCE
) -> int:
    return len(reversed_pairs(moves, window_s, tolerance))


@dataclass(frozen=True)
class Flapping:
    """The reversals of the last FLAPPING_HORIZON_S and the rules whose moves they undid."""

    recent: int
    rules: tuple[str, ...]

    @property
    def flapping(self) -> bool:
        return self.recent >= FLAPPING_REVERSALS

    def message(self) -> str:
        if not self.recent:
            return f"no scale move was undone within {REVERSAL_WINDOW_S / 60:.0f} min of it in the last hour"
        fight = " and ".join(self.rules) if self.rules else "unnamed rules"
        return (
            f"{self.recent} scale moves in the last hour were undone within {REVERSAL_WINDOW_S / 60:.0f} min while "
            f"the load changed < {REVERSAL_TOLERANCE:.0%}: {fight} fight; widen the gap between their up and down "
            "thresholds, lengthen spec.scaling.scaleDown.stabilizationWindow, or let the slo model size the fleet"
        )


def flapping(moves: Iterable[Move], now: float, horizon_s: float = FLAPPING_HORIZON_S) -> Flapping:
    """What the last `horizon_s` of moves say: how many reversals, and which rules took part in them
    (in order of first appearance)."""
    pairs = [(a, b) for a, b in reversed_pairs(list(moves)) if now - b.t <= horizon_s]
    rules = dict.fromkeys(m.rule for pair in pairs for m in pair if m.rule)
    return Flapping(len(pairs), tuple(rules))
