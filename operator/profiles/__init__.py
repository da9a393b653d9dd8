"""Metric profiles by `spec.metrics.profile`: one module each behind `Profile`, a registry by name.

`voxscale` (the default) reads the metrics contract's door signals, `triton` NVIDIA Triton's own
per-model series, `promql` the user's queries. The scaler parses the profile with the spec; the
Prometheus adapter asks it for the PromQL of every signal the triggers read.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from voxscale.operator.policy import SpecError
from voxscale.operator.profiles.base import (
    APPROXIMATED,
    Approximation,
    Pods,
    Profile,
    Query,
    Signal,
    SignalKey,
    Unavailable,
)
from voxscale.operator.profiles.promql import PromQLProfile
from voxscale.operator.profiles.triton import Triton
from voxscale.operator.profiles.voxscale import Voxscale

FIELD = "spec.metrics"
VOXSCALE: Profile = Voxscale()


def _triton(settings: Mapping[str, Any]) -> Profile:
    model = (settings.get("triton") or {}).get("model")
    if not model:
        raise SpecError(f"{FIELD}.triton.model", "the triton profile needs the model's name as Triton serves it")
    return Triton(str(model))


def _promql(settings: Mapping[str, Any]) -> Profile:
    given = settings.get("promql") or {}
    if not given.get("arrivals"):
        raise SpecError(f"{FIELD}.promql.arrivals", "the promql profile needs a query for the requests/s arriving")
    if bool(given.get("completions")) != bool(given.get("busySeconds")):
        raise SpecError(f"{FIELD}.promql", "set both completions and busySeconds (capacity is their ratio) or neither")
    return PromQLProfile(given["arrivals"], given.get("completions"), given.get("busySeconds"), given.get("queue"))


REGISTRY: dict[str, Callable[[Mapping[str, Any]], Profile]] = {
    "voxscale": lambda _settings: VOXSCALE,
    "triton": _triton,
    "promql": _promql,
}


def from_spec(spec: Mapping[str, Any]) -> Profile:
    """The profile `spec.metrics` names, with its settings (SpecError naming the field to fix)."""
    settings = spec.get("metrics") or {}
    name = settings.get("profile", "voxscale")
    make = REGISTRY.get(name)
    if make is None:
        raise SpecError(f"{FIELD}.profile", f"unknown profile {name!r}; use one of {', '.join(REGISTRY)}")
    return make(settings)


def describe(profile: Profile) -> dict[str, Any]:
    """What status says about the signals behind a decision: the profile and what it approximated."""
    found = profile.approximations()
    out: dict[str, Any] = {"profile": profile.name}
    if found:
        out["approximated"] = [str(a) for a in found]
        out["message"] = "; ".join(APPROXIMATED[a] for a in found)
    return out


__all__ = [
    "APPROXIMATED",
    "REGISTRY",
    "VOXSCALE",
    "Approximation",
    "Pods",
    "Profile",
    "Query",
    "Signal",
    "SignalKey",
    "Unavailable",
    "describe",
    "from_spec",
]
