"""Inference benchmark (reports figures; not a test).

Side by side in one run, on the same voice (en_US-joe-medium) and texts:
  1. CPU real-time factor (synthesis seconds / audio seconds) of our torch pipeline vs onnxruntime
     running the Piper ONNX file on the same phoneme ids;
  2. the HTTP server (`voxscale serve`, a real process) against the pipeline alone (TTSPipeline.synthesize,
     sequential, in this process) in interleaved rounds, at 1, 4 and 16 concurrent clients: requests/s
     of both and the server's share of the pipeline's (median of the rounds), p50/p95 latency, the
     latency the server adds at one client (p50/p95), the time to first audio of `stream: true` and of
     SSE beside the whole file's latency, and the server's peak RSS (`--layouts 1,2,0`: a server per
     VOXSCALE_CPU_THREADS value, side by side);
  3. the quality cost of a half-precision vocoder (fp16, bf16) against fp32 at zero noise: SNR, max
     sample difference, and speaker-embedding similarity; on the CPU's kernels here, on CUDA's too
     with --cuda;
  4. with --cuda (on a GPU machine): throughput with batching vs batch size 1, fp32/fp16/bf16, VRAM;
     without a GPU, --cuda stops at once with a message (exit status 2);
  5. the request hot path: phonemising a 10-sentence request one espeak-ng process per sentence vs
     one for the request, and a repeated text's synthesis with the audio cache missed vs hit
     (medians; `--hot-path` runs this part alone, in seconds rather than minutes).

    .venv/bin/python -m bench.inference_bench [--requests 12] [--rounds 3] [--layouts 1,2] [--json out.json]
        [--cuda] [--hot-path] [--smoke]

--smoke runs every part at its smallest size (one repeat, one text, one round at 1 and 2 clients; the batching
part of --cuda on the CPU in fp32 when --cuda is not given) in seconds: it proves the bench runs and
reports its fields (tests/test_benches.py), its figures mean nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import functools
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import requests
import torch

from tests.inference_helpers import ServerProcess
from voxscale.inference.pipeline import DTYPES, Item, TTSPipeline
from voxscale.inference.piper import default_voice_paths
from voxscale.inference.text import Phonemizer, split_sentences
from voxscale.inference.vits import Scales

TEXTS = [
    "Welcome to today's lesson on the water cycle.",
    "The quick brown fox jumps over the lazy dog, and the dog does not seem to mind at all.",
    "Please remember to submit your assignments before Friday evening.",
    "In the morning the market opens early, and the first customers arrive before sunrise.",
]


def say(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def rtf_torch_vs_onnx(repeats: int = 5, texts: list[str] = TEXTS) -> dict[str, Any]:
    """Each engine in its own block (warm-up round first), same phoneme ids, noise_w 0 so both produce
    the same durations and so the same audio length. Interleaving them per utterance was unfair:
    each one's spinning worker threads stole the 2 cores from the other's next call."""
    pipe = TTSPipeline.load(precision="fp32", device="cpu")
    onnx_path, _ = default_voice_paths()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    sess = ort.InferenceSession(str(onnx_path), opts)
    ids = [pipe.prepare(t, (0.667, 1.0, 0.0))[0].ids for t in texts]
    sr = pipe.sample_rate

    def run_torch(seq: list[int]) -> int:
        with torch.inference_mode():
            wav, _ = pipe.voice(torch.tensor([seq]), torch.tensor([len(seq)]), Scales(0.667, 1.0, 0.0))
        return int(wav.shape[-1])

    def run_ort(seq: list[int]) -> int:
        out = sess.run(
            None,
            {
                "input": np.array([seq], dtype=np.int64),
                "input_lengths": np.array([len(seq)], dtype=np.int64),
                "scales": np.array([0.667, 1.0, 0.0], dtype=np.float32),
            },
        )[0]
        return int(out.shape[-1])

    out: dict[str, Any] = {}
    for name, fn in (("torch", run_torch), ("onnxruntime", run_ort)):
        for seq in ids:
            fn(seq)  # warm-up
        synth = audio = 0.0
        for _ in range(repeats):
            for seq in ids:
                start = time.perf_counter()
                samples = fn(seq)
                synth += time.perf_counter() - start
                audio += samples / sr
        out[name] = {"rtf": synth / audio, "audio_seconds": audio}
    out["torch_vs_onnxruntime"] = out["torch"]["rtf"] / out["onnxruntime"]["rtf"]
    out["threads"] = torch.get_num_threads()
    say(
        f"RTF torch {out['torch']['rtf']:.3f}, onnxruntime {out['onnxruntime']['rtf']:.3f} "
        f"({out['torch_vs_onnxruntime']:.2f}x) over {out['torch']['audio_seconds']:.0f} s of audio each"
    )
    return out


TEN_SENTENCES = " ".join(TEXTS) + (
    " Chapter two begins at 9:30 a.m. sharp. Did you read all 42 pages? Good! The end is near; keep going."
    " Thank you for listening, and see you next week."
)


def _median_s(fn: Any, repeats: int) -> float:
    """Median wall time of `fn()` over `repeats` runs, after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def hot_path(repeats: int = 9) -> dict[str, Any]:
    """Phonemes of a 10-sentence request, per sentence vs one call (no cache involved), and a
    repeated deterministic sentence synthesised with the audio cache cleared (miss) vs warm (hit)."""
    pipe = TTSPipeline.load(precision="fp32", device="cpu")
    phonemizer = Phonemizer(pipe.voice.piper.espeak_voice)
    sentences = split_sentences(TEN_SENTENCES)
    per_sentence = _median_s(lambda: [phonemizer.phonemize(x) for x in sentences], repeats)
    one_call = _median_s(lambda: phonemizer.phonemize_many(sentences), repeats)
    items = pipe.prepare(TEXTS[1], (0.667, 1.0, 0.8), seed=7)  # a seed: deterministic, so cacheable

    def miss() -> None:
        pipe.audio_cache.clear()
        pipe.synthesize(items)

    cache_miss = _median_s(miss, repeats)
    cache_hit = _median_s(lambda: pipe.synthesize(items), repeats)
    out = {
        "sentences": len(sentences),
        "phonemize_per_sentence_s": per_sentence,
        "phonemize_one_call_s": one_call,
        "phonemize_speedup": per_sentence / one_call,
        "audio_cache_miss_s": cache_miss,
        "audio_cache_hit_s": cache_hit,
        "audio_cache_speedup": cache_miss / cache_hit,
        "repeats": repeats,
    }
    say(f"hot path: {json.dumps(out)}")
    return out


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pctl(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _sequential_pipeline(pipe: TTSPipeline, items: list[list[Item]], n: int) -> tuple[float, list[float]]:
    """The pipeline alone, `n` requests one after another (text i % len): requests/s and each one's seconds."""
    times = []
    started = time.perf_counter()
    for i in range(n):
        t0 = time.perf_counter()
        pipe.synthesize(items[i % len(items)])
        times.append(time.perf_counter() - t0)
    return n / (time.perf_counter() - started), times


def _best_pipeline(pipe: TTSPipeline, items: list[list[Item]], n: int) -> tuple[float, list[float], int]:
    """The pipeline alone at the faster of one intra-op thread and torch's default, `n` requests: on
    shared cores two threads can be the faster or, while another process runs, several times the
    slower (a preempted thread stalls every barrier), so either alone would flatter the server some of
    the time. A probe (each text once at each count) picks the count; then the `n` requests are timed."""
    default = torch.get_num_threads()
    probes = []
    for threads in sorted({1, default}):
        torch.set_num_threads(threads)
        probes.append((_sequential_pipeline(pipe, items, len(items))[0], threads))
    threads = max(probes)[1]
    torch.set_num_threads(threads)
    try:
        return (*_sequential_pipeline(pipe, items, n), threads)
    finally:
        torch.set_num_threads(default)


class _Clients:
    """Closed-loop HTTP clients, one keep-alive session per client thread (no TCP set-up per request)."""

    def __init__(self, url: str) -> None:
        self.url, self.local = url, threading.local()

    def session(self) -> requests.Session:
        if not hasattr(self.local, "session"):
            self.local.session = requests.Session()
        session: requests.Session = self.local.session
        return session

    def whole(self, text: str) -> float:
        """Seconds until the whole wav has arrived."""
        start = time.perf_counter()
        r = self.session().post(f"{self.url}/v1/audio/speech", json={"input": text, "response_format": "wav"})
        r.raise_for_status()
        return time.perf_counter() - start

    def first_audio(self, text: str, sse: bool) -> tuple[float, float]:
        """Seconds until the first audio bytes (`stream: true`) or the first speech.audio.delta (SSE), and
        until the last."""
        body = {"input": text, "response_format": "wav", "stream": True}
        if sse:
            body["stream_format"] = "sse"
        start = time.perf_counter()
        first = None
        with self.session().post(f"{self.url}/v1/audio/speech", json=body, stream=True) as r:
            r.raise_for_status()
            for chunk in r.iter_content(chunk_size=None):
                if first is None and chunk and (not sse or b"speech.audio.delta" in chunk):
                    first = time.perf_counter() - start
        total = time.perf_counter() - start
        return (total if first is None else first), total

    def run(self, fn: Any, args: list[Any], clients: int) -> tuple[float, list[Any]]:
        """`fn(arg)` for every arg from `clients` threads at once: requests/s and the results in order."""
        started = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(clients) as pool:
            out = list(pool.map(fn, args))
        return len(args) / (time.perf_counter() - started), out


def http_vs_pipeline(
    requests_per_level: int,
    levels: tuple[int, ...] = (1, 4, 16),
    rounds: int = 3,
    layouts: tuple[str, ...] = ("",),
    stream_requests: int = 8,
    texts: list[str] = TEXTS,
) -> dict[str, Any]:
    """`voxscale serve` (a real process per layout: VOXSCALE_CPU_THREADS, "" for the default) against the
    pipeline alone in this process, in interleaved rounds: per round and level, the pipeline runs the
    same number of requests sequentially (the same texts, phonemes cached on both sides) right before
    each server does. Reported per level (medians over rounds): requests/s of both and the server's
    share of the pipeline's; at one client the latency the server adds (its latency minus the
    pipeline's median for the same text in that round, p50/p95); and the time to first audio of
    `stream: true` and of SSE beside the whole file's latency, on two-sentence texts."""
    pipe = TTSPipeline.load(precision="fp32", device="cpu")
    scales = (0.667, 1.0, 0.8)
    items = [pipe.prepare(t, scales) for t in texts]
    pairs = [f"{texts[i]} {texts[(i + 1) % len(texts)]}" for i in range(len(texts))]  # two sentences each
    for it in items:
        pipe.synthesize(it)  # warm-up
    raw: dict[str, dict[int, dict[str, list[Any]]]] = {lay: {c: {} for c in levels} for lay in layouts}
    with tempfile.TemporaryDirectory() as tmp:
        servers = {
            lay: ServerProcess.start(
                Path(tmp),
                VOXSCALE_MAX_QUEUE="256",
                VOXSCALE_MAX_BATCH_SIZE="8",
                **({"VOXSCALE_CPU_THREADS": lay} if lay else {}),
            )
            for lay in layouts
        }
        try:
            clients_of = {lay: _Clients(server.url) for lay, server in servers.items()}
            for c in clients_of.values():  # warm-up: phonemes cached, connections open
                c.run(c.whole, [*texts, *pairs], 1)
            for rnd in range(rounds):
                for clients in levels:
                    n = max(requests_per_level, clients * 2)
                    args = [texts[i % len(texts)] for i in range(n)]
                    for lay in layouts:
                        pipe_rps, pipe_times, threads = _best_pipeline(pipe, items, n)
                        rec = raw[lay][clients]
                        rec.setdefault("pipeline_threads", []).append(threads)
                        c = clients_of[lay]
                        rps, lat = c.run(c.whole, args, clients)
                        rec.setdefault("pipeline_rps", []).append(pipe_rps)
                        rec.setdefault("rps", []).append(rps)
                        rec.setdefault("share", []).append(rps / pipe_rps)
                        rec.setdefault("latency", []).extend(lat)
                        if clients == 1:
                            per_text = {
                                t: statistics.median(pipe_times[i :: len(texts)]) for i, t in enumerate(texts[:n])
                            }
                            rec.setdefault("added", []).extend(x - per_text[t] for x, t in zip(lat, args, strict=True))
                        m = max(stream_requests, clients)
                        stream_args = [pairs[i % len(pairs)] for i in range(m)]
                        for kind, sse in (("stream", False), ("sse", True)):
                            _, firsts = c.run(functools.partial(c.first_audio, sse=sse), stream_args, clients)
                            rec.setdefault(f"ttfa_{kind}", []).extend(f for f, _ in firsts)
                        _, whole = c.run(c.whole, stream_args, clients)
                        rec.setdefault("whole_two_sentences", []).extend(whole)
                        say(
                            f"round {rnd + 1}/{rounds}, layout {lay or 'default'}, {clients} clients: "
                            f"server {rps:.2f} req/s, pipeline {pipe_rps:.2f} req/s, share {rps / pipe_rps:.2f}"
                        )
            rss = {lay: peak_rss_mib(server.proc.pid) for lay, server in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
    out: dict[str, Any] = {"rounds": rounds, "torch_threads": torch.get_num_threads(), "layouts": {}}
    for lay in layouts:
        rows = []
        for clients in levels:
            rec = raw[lay][clients]
            row: dict[str, Any] = {
                "clients": clients,
                "requests": max(requests_per_level, clients * 2),
                "rps": statistics.median(rec["rps"]),
                "pipeline_rps": statistics.median(rec["pipeline_rps"]),
                "pipeline_threads": rec["pipeline_threads"],  # per round: the faster of 1 and torch's default
                "share": statistics.median(rec["share"]),
                "shares": rec["share"],
                "p50_s": statistics.median(rec["latency"]),
                "p95_s": _pctl(rec["latency"], 0.95),
                "server_peak_rss_mib": rss[lay],
            }
            if "added" in rec:
                row["added_p50_ms"] = 1000 * statistics.median(rec["added"])
                row["added_p95_ms"] = 1000 * _pctl(rec["added"], 0.95)
            for key in ("ttfa_stream", "ttfa_sse", "whole_two_sentences"):
                row[f"{key}_p50_s"] = statistics.median(rec[key])
                row[f"{key}_p95_s"] = _pctl(rec[key], 0.95)
            rows.append(row)
            say(json.dumps({"layout": lay or "default", **{k: v for k, v in row.items() if k != "shares"}}))
        out["layouts"][lay or "default"] = rows
    out["rows"] = out["layouts"][layouts[0] or "default"]
    return out


def precision_quality(device: str, texts: list[str] = TEXTS) -> dict[str, Any]:
    """How far a half-precision vocoder moves the waveform from fp32's, same ids and zero noise.

    SNR of fp32 against the difference, the largest sample difference (audio in [-1, 1]), and the
    cosine similarity of the speaker embeddings of the two renderings (1.0: the same voice)."""
    pipe = TTSPipeline.load(precision="fp32", device=device)
    items = [pipe.prepare(t, (0.0, 1.0, 0.0))[0] for t in texts]
    reference = [pipe.synthesize([item])[0] for item in items]
    ref_audio = np.concatenate(reference)
    ref_embedding = pipe.embed(ref_audio, pipe.sample_rate)
    out: dict[str, Any] = {"device": device}
    for precision in ("fp16", "bf16"):
        pipe.voice.vocoder.to(DTYPES[precision])
        audio = np.concatenate([pipe.synthesize([item])[0] for item in items])
        pipe.voice.vocoder.float()
        error = audio - ref_audio
        out[precision] = {
            "snr_db": float(10 * np.log10(np.sum(ref_audio**2) / np.sum(error**2))),
            "max_abs_diff": float(np.abs(error).max()),
            "speaker_cosine": float(np.dot(ref_embedding, pipe.embed(audio, pipe.sample_rate))),
        }
        say(f"{precision} vocoder on {device}: {json.dumps(out[precision])}")
    return out


def batching(
    device: str,
    precisions: tuple[str, ...] = ("fp32", "fp16", "bf16"),
    batches: tuple[int, ...] = (1, 8, 32),
    copies: int = 8,
    texts: list[str] = TEXTS,
) -> dict[str, Any]:
    """Throughput per batch size and precision, and the peak VRAM of each precision's replica (None
    off CUDA). On the CPU the pipeline runs fp32 whatever is asked, so only fp32 means anything there:
    --smoke runs it so to keep this part of --cuda working on machines without a GPU."""
    cuda = device == "cuda"
    out: dict[str, Any] = {}
    for precision in precisions:
        pipe = TTSPipeline.load(precision=precision, device=device)
        items = [pipe.prepare(t, (0.667, 1.0, 0.8))[0] for t in texts] * copies
        pipe.synthesize(items[:8])
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        for batch in batches:
            start = time.perf_counter()
            audio = 0.0
            for i in range(0, len(items), batch):
                audio += sum(len(w) for w in pipe.synthesize(items[i : i + batch])) / pipe.sample_rate
            if cuda:
                torch.cuda.synchronize()
            wall = time.perf_counter() - start
            out[f"{precision}_batch{batch}"] = {"requests_per_s": len(items) / wall, "rtf": wall / audio}
        out[f"{precision}_peak_vram_mib"] = torch.cuda.max_memory_allocated() / 2**20 if cuda else None
        mine = {k: v for k, v in out.items() if k.startswith(precision)}
        say(f"batching on {device}, {precision}: {json.dumps(mine)}")
    return out


def cuda_figures(smoke: bool = False) -> dict[str, Any]:
    texts = TEXTS[:1] if smoke else TEXTS
    figures = batching("cuda", batches=(1, 2), copies=1, texts=TEXTS[:2]) if smoke else batching("cuda")
    return {"device": torch.cuda.get_device_name(0), "quality": precision_quality("cuda", texts), **figures}


def no_cuda_reason() -> str | None:
    """Why --cuda cannot run here (None: it can)."""
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA; --cuda needs a CUDA build and an NVIDIA GPU"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device here (torch.cuda.is_available() is False): run --cuda on a GPU machine"
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=12, help="requests per concurrency level and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of pipeline vs server")
    parser.add_argument(
        "--layouts", default="", help="VOXSCALE_CPU_THREADS values, comma-separated: a server each ('' = default)"
    )
    parser.add_argument("--json", type=Path)
    parser.add_argument("--cuda", action="store_true", help="also measure batching, fp16 and VRAM on CUDA")
    parser.add_argument("--hot-path", action="store_true", help="only the phonemiser and audio-cache figures")
    parser.add_argument("--smoke", action="store_true", help="every part at its smallest size (seconds; for tests)")
    args = parser.parse_args(argv)
    if args.cuda and (reason := no_cuda_reason()):
        parser.error(f"--cuda: {reason}")
    if args.requests < 1:
        parser.error("--requests: must be at least 1")
    smoke = args.smoke
    result: dict[str, Any]
    if args.hot_path:
        result = hot_path(repeats=1 if smoke else 9)
    else:
        texts = TEXTS[:1] if smoke else TEXTS
        result = {
            "cpu_rtf": rtf_torch_vs_onnx(repeats=1, texts=texts) if smoke else rtf_torch_vs_onnx(),
            "cpu_precision_quality": precision_quality("cpu", texts),
            "http": (
                http_vs_pipeline(1, levels=(1, 2), rounds=1, stream_requests=1, texts=TEXTS[:2])
                if smoke
                else http_vs_pipeline(args.requests, rounds=args.rounds, layouts=tuple(args.layouts.split(",")))
            ),
            "hot_path": hot_path(repeats=1 if smoke else 9),
        }
        if args.cuda:
            result["cuda"] = cuda_figures(smoke)
        elif smoke:  # the batching code of --cuda, on the CPU, so that it cannot rot unseen
            figures = batching("cpu", ("fp32",), batches=(1, 2), copies=1, texts=TEXTS[:2])
            result["batching_cpu"] = {"device": "cpu", **figures}
    if smoke:
        result["smoke"] = True
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
