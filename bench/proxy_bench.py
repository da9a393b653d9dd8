"""The door sidecar's overhead (reports figures; not a test): the server alone vs the same server behind the door.

One run, interleaved: each round sends a closed loop of C clients (C = 1, then 16) for `--seconds`
straight to the server and then through the door (the order alternates between rounds, so a drift
of the machine hits both legs alike); the figures are medians over `--rounds` rounds of each round's
p50 added latency (door p50 - server p50) and throughput ratio (door / server requests per second).
Goal (issue 23): < 1 ms added p50 and < 3 % throughput lost at 1 and 16 clients.

The server is a fixed-cost stand-in unless Piper's own HTTP server is installed (`piper-tts`): a
FastAPI app under uvicorn, as Kokoro-FastAPI, GPT-SoVITS and CosyVoice are served, that answers
POST /v1/audio/speech after `--service-ms` with `--bytes` of audio-like body. The overhead, not the
synthesis, is what is measured; the door runs with concurrency >= clients, so nothing queues at it.

    .venv/bin/python -m bench.proxy_bench [--rounds 3] [--seconds 3] [--clients 1,16] [--service-ms 20]
        [--bytes 32768] [--proxy-cmd 'CMD with {listen} {upstream} {metrics_port}'] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
from fastapi import FastAPI, Request, Response

REPO = Path(__file__).resolve().parent.parent
PATH = "/v1/audio/speech"
BODY = json.dumps({"model": "tts-1", "voice": "alloy", "input": "The door sidecar adds almost nothing."}).encode()
DOOR_CMD = (
    f"{sys.executable} -m voxscale.proxy --listen {{listen}} --upstream {{upstream}} --metrics-port {{metrics_port}} "
    "--health-path /health --concurrency {concurrency} --queue 64"
)


def say(msg: str) -> None:
    print(f"[proxy-bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ the stand-in server
def upstream_app(service_ms: float, size: int) -> FastAPI:
    """A fixed-cost TTS stand-in: FastAPI, as most TTS servers are."""
    app = FastAPI()
    audio = bytes(range(256)) * (size // 256) + bytes(size % 256)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post(PATH)
    async def speech(request: Request) -> Response:
        await request.body()
        await asyncio.sleep(service_ms / 1000)
        return Response(audio, media_type="audio/wav")

    return app


def serve_upstream(port: int, service_ms: float, size: int) -> None:
    import uvicorn

    uvicorn.run(upstream_app(service_ms, size), host="127.0.0.1", port=port, log_level="warning")


# ---------------------------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, timeout: float = 30.0) -> None:
    """Until `url` answers 200, or a TimeoutError naming it."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=1) as resp:
            if resp.status == 200:
                return
        time.sleep(0.05)
    raise TimeoutError(f"{url} did not answer 200 within {timeout:g} s")


@contextlib.contextmanager
def process(cmd: list[str], ready_url: str) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_http(ready_url)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def piper_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("piper") is not None and importlib.util.find_spec("piper.http_server") is not None


# -------------------------------------------------------------------------------------------------- load
@dataclass(frozen=True)
class Leg:
    """One closed-loop run against one target."""

    ok: int
    errors: int
    seconds: float
    p50_ms: float
    cpu_s: float  # CPU time the watched process (the server alone, or the door) spent on the leg

    @property
    def rps(self) -> float:
        return self.ok / self.seconds


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; 0 elsewhere): what a request costs, whatever
    else the machine runs, where wall-clock latency on a shared machine includes waiting for a core."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(url: str, clients: int, seconds: float, watch: int) -> Leg:
    """`clients` workers, each sending the next request when the last is answered, for `seconds`;
    `watch` is the pid whose CPU time is taken over the leg."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        for _ in range(clients):  # warm the connections: the first connect is not what is measured
            async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                await r.read()
        cpu0, start = cpu_seconds(watch), time.perf_counter()
        stop = start + seconds

        async def worker() -> None:
            nonlocal errors
            while (t0 := time.perf_counter()) < stop:
                async with session.post(url, data=BODY, headers={"Content-Type": "application/json"}) as r:
                    await r.read()
                    if r.status == 200:
                        latencies.append(time.perf_counter() - t0)
                    else:
                        errors += 1

        await asyncio.gather(*(worker() for _ in range(clients)))
        elapsed, cpu = time.perf_counter() - start, cpu_seconds(watch) - cpu0
    if not latencies:
        raise RuntimeError(f"{url}: no request answered 200 in {seconds:g} s ({errors} other answers)")
    return Leg(len(latencies), errors, elapsed, statistics.median(latencies) * 1000, cpu)


@dataclass(frozen=True)
class Figures:
    clients: int
    rounds: int
    server_p50_ms: float
    door_p50_ms: float
    added_p50_ms: float  # median over rounds of (door p50 - server p50)
    server_rps: float
    door_rps: float
    throughput_ratio: float  # median over rounds of door rps / server rps
    server_cpu_us_per_request: float  # the server alone: its process's CPU per request
    door_cpu_us_per_request: float  # the door's own process's CPU per request (not the server's)
    errors: int


def summarise(clients: int, pairs: list[tuple[Leg, Leg]]) -> Figures:
    med = statistics.median
    return Figures(
        clients=clients,
        rounds=len(pairs),
        server_p50_ms=round(med(s.p50_ms for s, _ in pairs), 3),
        door_p50_ms=round(med(d.p50_ms for _, d in pairs), 3),
        added_p50_ms=round(med(d.p50_ms - s.p50_ms for s, d in pairs), 3),
        server_rps=round(med(s.rps for s, _ in pairs), 1),
        door_rps=round(med(d.rps for _, d in pairs), 1),
        throughput_ratio=round(med(d.rps / s.rps for s, d in pairs), 4),
        server_cpu_us_per_request=round(med(1e6 * s.cpu_s / s.ok for s, _ in pairs), 1),
        door_cpu_us_per_request=round(med(1e6 * d.cpu_s / d.ok for _, d in pairs), 1),
        errors=sum(s.errors + d.errors for s, d in pairs),
    )


@dataclass(frozen=True)
class Target:
    url: str
    pid: int  # whose CPU the leg watches


async def measure(server: Target, door: Target, clients: list[int], rounds: int, seconds: float) -> list[Figures]:
    pairs: dict[int, list[tuple[Leg, Leg]]] = {c: [] for c in clients}
    for r in range(rounds):
        for c in clients:
            first, second = (server, door) if r % 2 == 0 else (door, server)
            a = await closed_loop(first.url + PATH, c, seconds, first.pid)
            b = await closed_loop(second.url + PATH, c, seconds, second.pid)
            s, d = (a, b) if first == server else (b, a)
            server_leg, door_leg = f"{s.p50_ms:.2f} ms {s.rps:.0f}/s", f"{d.p50_ms:.2f} ms {d.rps:.0f}/s"
            say(f"round {r + 1}, {c} clients: server p50 {server_leg}, door {door_leg}")
            pairs[c].append((s, d))
    return [summarise(c, pairs[c]) for c in clients]


# ---------------------------------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict[str, Any]:
    clients = [int(c) for c in args.clients.split(",")]
    up_port, door_port, metrics_port = free_port(), free_port(), free_port()
    server, door = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{door_port}"
    upstream_cmd = [sys.executable, "-m", "bench.proxy_bench", "--serve-upstream", str(up_port)]
    upstream_cmd += ["--service-ms", str(args.service_ms), "--bytes", str(args.bytes)]
    door_cmd = args.proxy_cmd.format(
        listen=f"127.0.0.1:{door_port}",
        upstream=f"127.0.0.1:{up_port}",
        metrics_port=metrics_port,
        concurrency=max(clients),
    )
    say("Piper's HTTP server is installed but not driven here yet" if piper_available() else "piper-tts not installed")
    say(f"upstream: fixed-cost FastAPI/uvicorn stand-in, {args.service_ms:g} ms, {args.bytes} bytes")
    with process(upstream_cmd, server + "/health") as up, process(shlex.split(door_cmd), door + "/health") as dp:
        figures = asyncio.run(measure(Target(server, up.pid), Target(door, dp.pid), clients, args.rounds, args.seconds))
    return {
        "upstream": f"fixed-cost FastAPI/uvicorn stand-in ({args.service_ms:g} ms, {args.bytes} bytes)",
        "door": door_cmd.replace(sys.executable, "python"),
        "seconds_per_leg": args.seconds,
        "cpus": os.cpu_count(),
        "load_average_1m_at_end": round(os.getloadavg()[0], 2),  # a shared machine's other work shows here
        "goal": {"added_p50_ms": 1.0, "throughput_ratio": 0.97},
        "figures": [asdict(f) for f in figures],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0, help="per leg (default %(default)s)")
    parser.add_argument("--clients", default="1,16")
    parser.add_argument("--service-ms", type=float, default=20.0, help="the stand-in's cost per request")
    parser.add_argument("--bytes", type=int, default=32768, help="the stand-in's answer size")
    parser.add_argument("--proxy-cmd", default=DOOR_CMD, help="the proxy to measure (default: the door)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.service_ms, args.bytes)
        return 0
    report = run(args)
    text = json.dumps(report, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
