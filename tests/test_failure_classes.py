"""The failure classes of issue 21, each replayed through the simulator against the KEDA + HPA model.

Manifests are written the way users write them (threshold rules from the seed documents, no slo
trigger): the SLO model runs anyway, as the contract every TTSDeployment gets. Traces are built here,
small and seeded, so each class is a test of its own:
- threshold rules on a noisy plateau: no flapping, SLO held;
- on/off bursts of 30-90 s with idle minutes between, under sustain rules: voxscale reacts;
- a schedule window ending under load: no cliff.
"""

from __future__ import annotations

import datetime as dt

import numpy as np

from tests.engine_helpers import policy
from voxscale.simulator.baselines import KedaHpaModel
from voxscale.simulator.model import CapacityModel
from voxscale.simulator.policies import VoxscaleAutoscaler
from voxscale.simulator.run import Comparison, RunResult, compare, simulate
from voxscale.simulator.traces import Trace

START = dt.datetime(2026, 3, 2, 12, 0, tzinfo=dt.UTC)  # a Monday, noon
CAPACITY = CapacityModel()  # 16 requests/s per replica, 45 s cold start: the CRD's replicaCapacity default

# The seed rules: GPU above 70 % for 1 min up, below 40 % down, a queue target, a weekday cron floor,
# one pod per 30 s after a 5 min window.
PLATEAU_RULES = {
    "triggers": [
        {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 70, "sustainFor": "1m", "scaleDownBelow": 40},
        {"name": "queue", "type": "queueLength", "target": 8},
    ],
    "schedules": [{"name": "weekday", "cron": "0 8 * * 1-5", "duration": "10h", "minReplicas": 2}],
    "scaleDown": {"stabilizationWindow": "5m", "maxStepPods": 1, "maxStepPercent": 1, "period": "30s"},
}
# The seed rules for bursty traffic: GPU above 75 % for 3 min, or a queue above 20 for 2 min.
SUSTAIN_RULES = {
    "triggers": [
        {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 75, "sustainFor": "3m", "scaleDownBelow": 40},
        {"name": "queue", "type": "queueLength", "scaleUpAbove": 20, "sustainFor": "2m", "scaleDownBelow": 5},
    ]
}


def _run(result: Comparison, name: str) -> RunResult:
    return next(r for r in result.runs if r.summary.autoscaler.startswith(name))


def reversals(run: RunResult) -> int:
    """Moves undone within REVERSAL_WINDOW_S while the load changed by less than REVERSAL_TOLERANCE:
    the simulator's own count (operator/reversals.py count_reversals), the one definition the
    generalization bench judges by too."""
    return run.summary.reversals


def noisy_plateau(level: float, hours: float = 3.0, sigma: float = 0.15, seed: int = 2) -> Trace:
    """A ramp to `level` requests/s, a plateau that wobbles minute to minute (lognormal, `sigma`), and a
    ramp down: an afternoon of production traffic."""
    n = int(hours * 3600)
    wobble = np.repeat(np.exp(np.random.default_rng(seed).normal(0, sigma, n // 60 + 1)), 60)[:n]
    base = np.interp(np.arange(n), [0, 1200, n - 1200, n], [2, level, level, 2])
    return Trace("plateau", START, 1.0, base * wobble)


def on_off_bursts(hours: float = 2.0, seed: int = 1) -> Trace:
    """Bursts of 30-90 s at 40-90 requests/s with 1-5 idle minutes between (a trickle meanwhile)."""
    rng = np.random.default_rng(seed)
    n = int(hours * 3600)
    rps = np.full(n, 0.5)
    t = 120
    while t < n:
        length = int(rng.integers(30, 91))
        rps[t : t + length] = rng.uniform(40, 90)
        t += length + int(rng.integers(60, 300))
    return Trace("bursts", START, 1.0, rps)


def test_threshold_rules_on_a_plateau_do_not_flap_and_hold_the_slo() -> None:
    trace = noisy_plateau(level=20.0, sigma=0.3)
    result = compare(trace, VoxscaleAutoscaler(policy(PLATEAU_RULES)), CAPACITY, stochastic=True, seed=3)
    vox, keda = _run(result, "voxscale"), _run(result, "keda")
    assert reversals(vox) <= 1, vox.summary
    assert vox.summary.within_slo_percent >= 99.5, vox.summary
    assert vox.summary.within_slo_percent >= keda.summary.within_slo_percent - 0.1
    assert vox.summary.scale_events <= keda.summary.scale_events


def test_on_off_bursts_under_sustain_rules_are_answered_from_demand() -> None:
    trace = on_off_bursts()
    result = compare(trace, VoxscaleAutoscaler(policy(SUSTAIN_RULES)), CAPACITY, stochastic=True, seed=3)
    vox, keda = _run(result, "voxscale"), _run(result, "keda")
    assert vox.summary.scale_events > 0  # the 3-minute and 2-minute sustain clocks never fire on 30-90 s bursts
    assert vox.summary.within_slo_percent >= 90.0, vox.summary
    assert vox.summary.within_slo_percent >= keda.summary.within_slo_percent, (vox.summary, keda.summary)
    assert reversals(vox) <= reversals(keda)


def test_a_schedule_ending_under_load_lowers_the_count_without_a_cliff() -> None:
    # 50 requests/s (four replicas' worth) throughout; a floor of 10 until 13:30. The rules alone
    # would drop to one replica when the window ends (no trigger asks while the GPU is under 80 %).
    rules = {
        "triggers": [
            {"name": "gpu", "type": "gpuUtilization", "scaleUpAbove": 80, "sustainFor": "3m", "scaleDownBelow": 50}
        ],
        "schedules": [{"name": "launch", "cron": "30 12 * * *", "duration": "1h", "minReplicas": 10}],
    }
    trace = Trace("schedule-end", START + dt.timedelta(minutes=45), 1.0, np.full(3600, 50.0))
    pol = policy(rules)
    vox = simulate(trace, VoxscaleAutoscaler(pol), CAPACITY, 10, stochastic=True, seed=3)
    keda = simulate(trace, KedaHpaModel(pol), CAPACITY, 10, stochastic=True, seed=3)
    t, desired, p95 = np.asarray(vox.t), np.asarray(vox.desired), np.asarray(vox.p95)
    end = 45 * 60.0  # 13:30
    after = t >= end
    assert desired[np.searchsorted(t, end + 240)] == 10  # the 5m scale-down window holds the floor
    assert desired[after].min() >= 4  # never below what 50 requests/s need
    assert p95[after].max() <= 2.0
    assert vox.summary.within_slo_percent >= 99.9
    assert vox.summary.within_slo_percent >= keda.summary.within_slo_percent - 0.1
