"""Goodput under overload (reports figures; not a test): requests answered within the client's timeout, per second.

Drives real `voxscale serve` processes (the CPU, one voice) with a real HTTP client. It measures the
baseline's capacity as the replica does (completed requests per busy second, under a closed loop of
clients), then sends an open loop at a fixed interval: twice
that capacity (`--load`) for `--seconds`, then half of it for `--recovery` seconds (the burst is over).
Each client hangs up after `--timeout` seconds (5 service times by default), as an impatient client or
a gateway does. The same schedule goes to the baseline (`--baseline`, a git revision, served from a
`git archive` of it) and to the working tree, in one run. A request counts for the window it was sent
in; goodput is the requests answered 200 within the timeout per second of the window. The working
tree's capacity is measured too: far from the baseline's, the machine was busy and the run says so.
About 2 minutes with the defaults.

    .venv/bin/python -m bench.goodput_bench [--baseline HEAD] [--seconds 20] [--recovery 15] [--timeout S]
        [--load 2] [--capacity-seconds 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import itertools
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.inference_helpers import ServerProcess
from voxscale import metrics_contract as mc

REPO = Path(__file__).resolve().parent.parent
# Folder -> subpackage, as pyproject.toml maps them (a git archive has the folders, not the mapping).
MAPPED = {"inference": "inference", "operator": "operator", "crds": "crds"}
TEXT = "Request number {i} is here, and it would like a short answer."


def say(msg: str) -> None:
    print(f"[goodput] {msg}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Window:
    """One stretch of the schedule: what was sent and what came back within the timeout."""

    name: str
    offered_rps: float
    seconds: float
    ok: int = 0  # 200 within the timeout
    abandoned: int = 0  # the client gave up at its timeout
    refused: int = 0  # 429 or 503
    other: int = 0

    @property
    def goodput_rps(self) -> float:
        return self.ok / self.seconds


def baseline_tree(rev: str, dest: Path) -> Path:
    """`rev`'s sources laid out as the installed package, for PYTHONPATH (which comes before the editable install)."""
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for folder, module in MAPPED.items():
        (dest / "voxscale" / module).symlink_to(dest / folder, target_is_directory=True)
    return dest


async def _speak(client: httpx.AsyncClient, url: str, i: int, timeout: float) -> str:
    """One request's outcome: ok, abandoned, refused or other."""
    try:
        async with asyncio.timeout(timeout):
            r = await client.post(f"{url}/v1/audio/speech", json={"input": TEXT.format(i=i), "response_format": "pcm"})
    except TimeoutError:
        return "abandoned"
    if r.status_code == 200:
        return "ok"
    return "refused" if r.status_code in (429, 503) else "other"


def _client() -> httpx.AsyncClient:
    # No httpx timeout of its own: the request's deadline is the caller's asyncio.timeout.
    return httpx.AsyncClient(timeout=None, limits=httpx.Limits(max_connections=2000, max_keepalive_connections=200))


async def capacity(url: str, seconds: float, clients: int = 3) -> float:
    """Requests per busy second, as the replica measures it (what the autoscaler sizes from), under a
    closed loop of `clients` that keeps it busy without queueing deep."""
    deadline = time.monotonic() + seconds
    async with _client() as client:

        async def loop(worker: int) -> None:
            for i in itertools.count(worker, clients):
                if time.monotonic() > deadline:
                    return
                await _speak(client, url, i, 60)

        await asyncio.gather(*(loop(w) for w in range(clients)))
        text = (await client.get(f"{url}/metrics")).text
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return samples[mc.COMPLETED_REQUESTS.name] / samples[mc.BUSY_SECONDS.name]


async def open_loop(url: str, schedule: list[Window], timeout: float) -> list[Window]:
    """Each window's requests at a fixed interval, whatever came back; then the stragglers."""
    sends = [(at, w) for w in range(len(schedule)) for at in _times(schedule, w)]
    started = time.monotonic()
    async with _client() as client:
        tasks = []
        for i, (at, _) in enumerate(sends):
            await asyncio.sleep(max(0.0, started + at - time.monotonic()))
            tasks.append(asyncio.create_task(_speak(client, url, i, timeout)))
        outcomes = await asyncio.gather(*tasks)
    counts = [
        collections.Counter(o for (_, w), o in zip(sends, outcomes, strict=True) if w == n)
        for n in range(len(schedule))
    ]
    return [
        replace(window, ok=c["ok"], abandoned=c["abandoned"], refused=c["refused"], other=c["other"])
        for window, c in zip(schedule, counts, strict=True)
    ]


def _times(schedule: list[Window], n: int) -> list[float]:
    """Send times (s from the start) of window `n`'s requests."""
    begin = sum(w.seconds for w in schedule[:n])
    window = schedule[n]
    return [begin + i / window.offered_rps for i in range(round(window.offered_rps * window.seconds))]


def _serve(log_dir: Path, tree: Path | None) -> ServerProcess:
    """The working tree's server, or `tree`'s: first on the path, the working directory not on it at all."""
    env = {"PYTHONPATH": str(tree), "PYTHONSAFEPATH": "1"} if tree is not None else {}
    return ServerProcess.start(log_dir, **env)


def _stop(server: ServerProcess) -> None:
    """Killed, not drained: what it still holds is the dead work this bench is about."""
    server.proc.kill()
    server.proc.wait(timeout=30)


def _measure(
    name: str,
    log_dir: Path,
    tree: Path | None,
    plan: Callable[[float], tuple[list[Window], float]],
    capacity_seconds: float = 8.0,
) -> dict[str, Any]:
    """Start the server, measure its capacity, run the schedule `plan` makes (from the first capacity), kill it."""
    server = _serve(log_dir, tree)
    try:
        cap = asyncio.run(capacity(server.url, seconds=capacity_seconds))
        schedule, timeout = plan(cap)
        say(
            f"{name}: capacity {cap:.2f} req/s; "
            + ", then ".join(f"{w.offered_rps:.2f} req/s for {w.seconds:g} s" for w in schedule)
            + f", client timeout {timeout:.1f} s"
        )
        windows = asyncio.run(open_loop(server.url, schedule, timeout))
    finally:
        _stop(server)
    for w in windows:
        say(f"{name}, {w.name}: goodput {w.goodput_rps:.2f} req/s ({w})")
    return {
        "server": name,
        "capacity_rps": cap,
        "timeout_s": timeout,
        "windows": [{**asdict(w), "goodput_rps": w.goodput_rps} for w in windows],
    }


def run(
    baseline: str,
    seconds: float,
    recovery: float,
    timeout: float | None,
    load: float,
    capacity_seconds: float = 8.0,
) -> list[dict[str, Any]]:
    fixed: dict[str, Any] = {}

    def plan(cap: float) -> tuple[list[Window], float]:
        """The baseline's capacity sets the schedule for both servers."""
        if not fixed:
            fixed["schedule"] = [Window("overload", load * cap, seconds), Window("recovery", cap / 2, recovery)]
            fixed["timeout"] = timeout if timeout is not None else 5 / cap
        return fixed["schedule"], fixed["timeout"]

    with tempfile.TemporaryDirectory(prefix="goodput-") as tmp:
        root = Path(tmp)
        tree = baseline_tree(baseline, root / "baseline")
        (root / "logs").mkdir()
        before = _measure(f"baseline {baseline}", root / "logs", tree, plan, capacity_seconds)
        after = _measure("working tree", root / "logs", None, plan, capacity_seconds)
    return [before, after]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", default="HEAD", help="git revision to compare the working tree with")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the overload window")
    parser.add_argument("--recovery", type=float, default=15.0, help="length of the window at half capacity after it")
    parser.add_argument(
        "--timeout", type=float, help="seconds a client waits before it hangs up (default: 5 service times)"
    )
    parser.add_argument("--load", type=float, default=2.0, help="overload, in multiples of the measured capacity")
    parser.add_argument(
        "--capacity-seconds", type=float, default=8.0, help="how long each server's capacity is measured"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    results = run(args.baseline, args.seconds, args.recovery, args.timeout, args.load, args.capacity_seconds)
    print(
        f"{'server':<22} {'capacity/s':>10} {'window':<9} {'offered/s':>9} {'goodput/s':>9} "
        f"{'ok':>4} {'abandoned':>9} {'429/503':>7} {'other':>5}"
    )
    for r in results:
        for w in r["windows"]:
            print(
                f"{r['server']:<22} {r['capacity_rps']:>10.2f} {w['name']:<9} {w['offered_rps']:>9.2f} "
                f"{w['goodput_rps']:>9.2f} {w['ok']:>4} {w['abandoned']:>9} {w['refused']:>7} {w['other']:>5}"
            )
    caps = [r["capacity_rps"] for r in results]
    if max(caps) > 1.25 * min(caps):
        print(
            f"capacities differ by more than 25 % ({caps[0]:.2f} vs {caps[1]:.2f} req/s): "
            "the machine was busy; run again"
        )
    print(f"client timeout {results[0]['timeout_s']:.1f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
