"""The request hot path: one espeak-ng call per request, the phoneme and audio caches, batched audio
equal to unbatched, and the batcher's grouping, priorities, request ids, admission bound, withdrawn
requests and CUDA failures (out-of-memory split, sticky errors)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import subprocess
import threading
import time
import weakref
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from voxscale import metrics_contract as mc
from voxscale.inference.batcher import Batcher, Priority, QueueFull, _Job, _Request, plan_batch, sticky_cuda_error
from voxscale.inference.cache import LRUCache
from voxscale.inference.pipeline import Item, TTSPipeline
from voxscale.inference.server_metrics import ServerMetrics
from voxscale.inference.text import Phonemizer

SILENT = (0.0, 1.0, 0.0)  # no noise: the audio depends on the ids alone
NOISY = (0.667, 1.0, 0.8)
SENTENCES = [
    "Hello world.",
    "Dr. Smith paid $42.50 on 3/4/2021, didn't he?",
    "It's 7:30; the meeting (finally) starts!",
    "Wait... what?!",
    "I have 1,234 apples and 20% more pears.",
    '"Quoted," she said: yes.',
    "...!?",
    "Café naïve résumé.",
]
THREE = ["Hi.", "The quick brown fox jumps over the lazy dog.", "Autoscaling speech is hard; voxscale makes it boring."]

Synth = Callable[[list[Item]], list[np.ndarray]]


@pytest.fixture(scope="module")
def pipeline() -> TTSPipeline:
    return TTSPipeline.load(precision="fp32", device="cpu")


def _run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def _batcher(synthesize: Synth, **kw: Any) -> Batcher:
    return Batcher(synthesize, ServerMetrics.create(CollectorRegistry()), **kw)


def _item(n: int, seed: int | None = None) -> Item:
    return Item(list(range(n)), NOISY, seed)


def _recording(synthesize: Synth, seen: list[list[Item]], delay: float = 0.0) -> Synth:
    """`synthesize`, remembering each batch it was given (and taking `delay` seconds more)."""

    def run(items: list[Item]) -> list[np.ndarray]:
        seen.append(list(items))
        time.sleep(delay)
        return synthesize(items)

    return run


def _fake(items: list[Item]) -> list[np.ndarray]:
    """Plain data: an item's 'audio' is its length, so results can be traced to their items."""
    return [np.full(3, len(i.ids), dtype=np.float32) for i in items]


# ---------------------------------------------------------------------- phonemes
def test_one_call_phonemises_like_one_call_per_sentence() -> None:
    phonemizer = Phonemizer()
    assert phonemizer.phonemize_many(SENTENCES) == [phonemizer.phonemize(s) for s in SENTENCES]


def test_a_request_is_phonemised_in_one_espeak_process(monkeypatch: pytest.MonkeyPatch) -> None:
    phonemizer = Phonemizer()
    phonemizer.phonemize_many(SENTENCES[:2])  # the sentinel's own rendering is looked up once
    calls: list[object] = []
    real = subprocess.run

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(subprocess, "run", counting)
    assert len(phonemizer.phonemize_many(SENTENCES)) == len(SENTENCES)
    assert len(calls) == 1


def test_prepare_phonemises_a_repeated_sentence_from_the_cache(pipeline: TTSPipeline) -> None:
    text = "This line repeats. An NPC says it often."
    first = pipeline.prepare(text, NOISY)
    hits = pipeline.phoneme_cache.hits
    assert pipeline.prepare(text, NOISY) == first
    assert pipeline.phoneme_cache.hits == hits + 2


def test_the_lru_is_bounded_in_entries_and_bytes_and_counts() -> None:
    cache: LRUCache[str, bytes] = LRUCache(max_entries=3, max_bytes=10, size=len)
    for key in "abc":
        cache.put(key, b"xx")
    assert cache.get("a") == b"xx"  # now the most recently used
    cache.put("d", b"xx")  # over 3 entries: b, the least recently used, goes
    assert cache.get("b") is None and len(cache) == 3
    cache.put("e", b"xxxxxx")  # 4 entries, 12 bytes: c, the least recently used, goes
    assert (cache.get("c"), cache.get("d"), cache.get("e")) == (None, b"xx", b"xxxxxx")
    assert (len(cache), cache.bytes) == (3, 10)
    cache.put("huge", b"x" * 11)  # larger than the whole cache: not stored, nothing evicted
    assert cache.get("huge") is None and len(cache) == 3
    assert (cache.hits, cache.misses) == (3, 3)


# ---------------------------------------------------------------------- audio cache
def test_deterministic_audio_is_cached_and_noisy_audio_is_not(pipeline: TTSPipeline) -> None:
    cache = pipeline.audio_cache
    seeded = pipeline.prepare("Reproducible, please.", NOISY, seed=3)
    first = pipeline.synthesize(seeded)
    hits = cache.hits
    again = pipeline.synthesize(seeded)
    assert cache.hits == hits + 1 and np.array_equal(first[0], again[0])
    again[0][:] = 0  # the caller owns its copy
    assert np.array_equal(pipeline.synthesize(seeded)[0], first[0])
    silent = pipeline.prepare("Reproducible, please.", SILENT)  # no seed, but no noise either
    pipeline.synthesize(silent)
    hits = cache.hits
    pipeline.synthesize(silent)
    assert cache.hits == hits + 1
    noisy = pipeline.prepare("Reproducible, please.", NOISY)
    lookups = cache.hits + cache.misses
    pipeline.synthesize(noisy)
    pipeline.synthesize(noisy)
    assert cache.hits + cache.misses == lookups  # never looked up: it would not be the same audio


# ---------------------------------------------------------------------- padding mask
def test_batched_audio_equals_unbatched_at_zero_noise(pipeline: TTSPipeline) -> None:
    items = [pipeline.prepare(t, SILENT)[0] for t in THREE]
    assert len({len(i.ids) for i in items}) == 3
    pipeline.audio_cache.clear()
    together = pipeline.synthesize(items)
    alone = []
    for item in items:
        pipeline.audio_cache.clear()  # each one synthesised, not answered from the batch's audio
        alone.append(pipeline.synthesize([item])[0])
    for a, b in zip(together, alone, strict=True):
        assert len(a) == len(b)
        assert np.abs(a - b).max() < 1e-4


# ---------------------------------------------------------------------- batching
@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    """An event loop only to create the futures that jobs carry (plan_batch never touches them)."""
    new = asyncio.new_event_loop()
    yield new
    new.close()


def _jobs(
    loop: asyncio.AbstractEventLoop, lengths: list[int], priority: Priority = "realtime", first: int = 0
) -> list[_Job]:
    """One request's sentences of these lengths, enqueued at time `first` (arrival order from there)."""
    request = _Request(len(lengths), priority, enqueued=float(first))
    return [_Job(_item(n), loop.create_future(), request, first + i) for i, n in enumerate(lengths)]


def _lengths(jobs: list[_Job]) -> list[int]:
    return [len(j.item.ids) for j in jobs]


def test_batches_group_similar_lengths_within_the_token_budget(loop: asyncio.AbstractEventLoop) -> None:
    pending = _jobs(loop, [10, 100, 12, 95, 11])
    first = plan_batch(pending, max_batch=4, token_budget=300, promote_before=-1)
    assert _lengths(first) == [10, 11, 12]  # 95 would pad all four to 380 ids
    rest = [j for j in pending if j not in first]
    assert _lengths(plan_batch(rest, 4, 300, -1)) == [95, 100]
    assert _lengths(plan_batch(_jobs(loop, [500, 10]), 4, 300, -1)) == [500]  # over the budget: alone
    seeded = _Job(_item(10, seed=1), loop.create_future(), _Request(1), 0)
    assert plan_batch([seeded, *_jobs(loop, [10], first=1)], 4, 300, -1) == [seeded]  # a seed is honoured alone


def test_realtime_fills_a_batch_before_batch_priority_unless_promoted(loop: asyncio.AbstractEventLoop) -> None:
    old_batch = _jobs(loop, [10, 10], "batch", first=0)
    realtime = _jobs(loop, [30, 30], "realtime", first=5)
    chosen = plan_batch(old_batch + realtime, max_batch=2, token_budget=10_000, promote_before=-1)
    assert all(j.request.priority == "realtime" for j in chosen)
    promoted = plan_batch(old_batch + realtime, max_batch=2, token_budget=10_000, promote_before=1.0)
    assert all(j.request.priority == "batch" for j in promoted)


def test_realtime_sentences_are_synthesised_before_batch_ones() -> None:
    seen: list[list[Item]] = []

    async def scenario() -> None:
        batcher = _batcher(_recording(_fake, seen, delay=0.02), max_batch=1, max_wait_ms=0)
        batcher.start()
        slow = batcher.submit([_item(n) for n in (1, 2, 3)], priority="batch", request_id="book")
        fast = batcher.submit([_item(n) for n in (4, 5)], priority="realtime", request_id="npc")
        await asyncio.gather(*slow, *fast)
        await batcher.stop()

    _run(scenario())
    assert [len(b[0].ids) for b in seen] == [4, 5, 1, 2, 3]


def test_a_batch_request_is_promoted_behind_a_stream_of_realtime_ones() -> None:
    seen: list[list[Item]] = []

    async def scenario() -> None:
        batcher = _batcher(_recording(_fake, seen, delay=0.02), max_batch=1, max_wait_ms=0, promote_after_s=0.1)
        batcher.start()
        waiting = batcher.submit([_item(99)], priority="batch")
        for _ in range(20):  # a realtime sentence every 10 ms: more than the worker can keep up with
            batcher.submit([_item(1)], priority="realtime")
            await asyncio.sleep(0.01)
        await asyncio.wait_for(waiting[0], 5)
        await batcher.stop()

    _run(scenario())
    served = [len(b[0].ids) for b in seen]
    assert 99 in served[:-1], served  # before the realtime stream had drained


def test_request_ids_are_in_the_batch_and_error_logs(caplog: pytest.LogCaptureFixture) -> None:
    def failing(items: list[Item]) -> list[np.ndarray]:
        raise ValueError("the vocoder fell over")

    async def scenario() -> None:
        ok = _batcher(_fake, max_batch=4)
        ok.start()
        await asyncio.gather(*ok.submit([_item(5)], request_id="req-ok-1"))
        await ok.stop()
        bad = _batcher(failing, max_batch=4)
        bad.start()
        with pytest.raises(ValueError):
            await asyncio.gather(*bad.submit([_item(5)], request_id="req-bad-2"))
        await bad.stop()

    with caplog.at_level(logging.INFO, logger="voxscale.inference.batcher"):  # what `voxscale serve` shows
        _run(scenario())
    info = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("req-ok-1" in m for m in info), info
    assert any("req-bad-2" in m and "the vocoder fell over" in m for m in errors), errors


def _speak_concurrently(batcher: Batcher, texts: list[str], pipeline: TTSPipeline) -> list[list[np.ndarray]]:
    """One request per text, all submitted before the worker runs; each request's audio."""

    async def scenario() -> list[list[np.ndarray]]:
        batcher.start()
        requests = [batcher.submit(pipeline.prepare(t, NOISY), request_id=f"r{i}") for i, t in enumerate(texts)]
        out = [list(await asyncio.gather(*futures)) for futures in requests]
        await batcher.stop()
        return out

    result: list[list[np.ndarray]] = _run(scenario())
    return result


def test_concurrent_requests_share_one_batch_on_the_cpu(pipeline: TTSPipeline) -> None:
    seen: list[list[Item]] = []
    batcher = _batcher(_recording(pipeline.synthesize, seen), max_batch=4, max_wait_ms=50)
    audio = _speak_concurrently(batcher, THREE, pipeline)
    assert [len(b) for b in seen] == [3]
    assert all(len(wavs) == 1 and len(wavs[0]) > 1000 for wavs in audio)


def test_cuda_out_of_memory_splits_the_batch_and_every_request_gets_its_audio(pipeline: TTSPipeline) -> None:
    seen: list[list[Item]] = []

    def small_gpu(items: list[Item]) -> list[np.ndarray]:
        if len(items) > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return pipeline.synthesize(items)

    batcher = _batcher(_recording(small_gpu, seen), max_batch=4, max_wait_ms=50)
    audio = _speak_concurrently(batcher, [*THREE, "One more."], pipeline)
    assert [len(b) for b in seen] == [4, 2, 1, 1, 2, 1, 1]
    assert all(len(wavs) == 1 and len(wavs[0]) > 1000 for wavs in audio)


def test_realtime_goes_first_through_the_real_pipeline(pipeline: TTSPipeline) -> None:
    seen: list[list[Item]] = []

    async def scenario() -> None:
        batcher = _batcher(_recording(pipeline.synthesize, seen), max_batch=1, max_wait_ms=0)
        batcher.start()
        book = batcher.submit(pipeline.prepare("Chapter one. It was a dark night.", NOISY), priority="batch")
        npc = batcher.submit(pipeline.prepare("Halt! Who goes there?", NOISY), priority="realtime")
        await asyncio.gather(*book, *npc)
        await batcher.stop()

    _run(scenario())
    order = [b[0].ids for b in seen]
    realtime = [i.ids for i in pipeline.prepare("Halt! Who goes there?", NOISY)]
    assert order[: len(realtime)] == realtime and len(order) == 4


# ---------------------------------------------------------------------- admission and withdrawal
def _gauge(batcher: Batcher, metric: mc.Metric) -> float | None:
    return batcher.metrics.registry.get_sample_value(metric.name)


def test_the_queue_bounds_requests_in_flight_and_sentences_waiting() -> None:
    """Batches take sentences of any request (the closest lengths), so a request is still waiting
    after its first sentence went: admission must count it, or requests pile up in flight."""
    max_queue, max_batch, lengths = 2, 4, [10, 20, 30, 40, 50]
    seen: list[tuple[int, int, int, float | None]] = []  # admitted, sentences waiting, requests waiting, gauge

    async def scenario() -> None:
        batcher = _batcher(_recording(_fake, [], delay=0.002), max_batch=max_batch, max_wait_ms=0, max_queue=max_queue)
        batcher.start()
        admitted: list[list[asyncio.Future[np.ndarray]]] = []
        for _ in range(150):  # a client that sends again as soon as there is room
            with contextlib.suppress(QueueFull):
                admitted.append(batcher.submit([_item(n) for n in lengths]))
            await asyncio.sleep(0.001)
            unfinished = sum(not all(f.done() for f in futures) for futures in admitted)
            waiting = {id(j.request) for j in batcher.pending}
            seen.append((unfinished, len(batcher.pending), len(waiting), _gauge(batcher, mc.QUEUE_DEPTH)))
        await asyncio.gather(*itertools.chain.from_iterable(admitted))
        await batcher.stop()

    _run(scenario())
    assert max(s[0] for s in seen) <= max_queue + max_batch, f"{max(seen)}: requests admitted, waiting, ..."
    assert max(s[1] for s in seen) <= max_queue * len(lengths), max(seen, key=lambda s: s[1])
    assert all(gauge == waiting for _, _, waiting, gauge in seen), [s for s in seen if s[3] != s[2]][:5]


def _gated(seen: list[list[Item]], gate: threading.Event) -> Synth:
    """Plain-data synthesis that holds its first batch until `gate` opens."""

    def run(items: list[Item]) -> list[np.ndarray]:
        seen.append(list(items))
        gate.wait(timeout=30)
        return _fake(items)

    return run


def test_a_request_nobody_waits_for_leaves_the_queue_before_it_costs_anything() -> None:
    seen: list[list[Item]] = []
    gate = threading.Event()

    async def scenario() -> None:
        batcher = _batcher(_gated(seen, gate), max_batch=1, max_wait_ms=0, max_queue=1)
        batcher.start()
        running = batcher.submit([_item(3)], request_id="running")
        while not seen:  # its batch is being synthesised, held at the gate
            await asyncio.sleep(0.001)
        dead = batcher.submit([_item(n) for n in (4, 5, 6)], request_id="timed-out")
        assert _gauge(batcher, mc.QUEUE_DEPTH) == 1
        with pytest.raises(TimeoutError):  # the caller gives up, as the server does at its timeout
            await asyncio.wait_for(asyncio.gather(*dead), 0.01)
        await asyncio.sleep(0)
        assert batcher.pending == [] and _gauge(batcher, mc.QUEUE_DEPTH) == 0
        later = batcher.submit([_item(7)], request_id="next")  # the queue has room again at once
        gate.set()
        await asyncio.gather(*running, *later)
        assert all(f.cancelled() for f in dead)
        await batcher.stop()

    try:
        _run(scenario())
    finally:
        gate.set()
    assert [len(b[0].ids) for b in seen] == [3, 7]  # the withdrawn request's sentences never ran


# ---------------------------------------------------------------------- CUDA failures
class SmallGpu(torch.nn.Module):
    """The real vocoder on a GPU with room for one sentence: a batch of more runs, then fails with
    CUDA out-of-memory; each call first notes whether an earlier failed attempt's latents are alive."""

    def __init__(self, vocoder: torch.nn.Module) -> None:
        super().__init__()
        self.vocoder = vocoder
        self.failed: list[weakref.ref[torch.Tensor]] = []
        self.alive_at_retry: list[bool] = []

    def forward(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        if self.failed:
            self.alive_at_retry.append(any(ref() is not None for ref in self.failed))
        wav: torch.Tensor = self.vocoder(z, g)
        if z.shape[0] > 1:
            self.failed.append(weakref.ref(z))
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return wav


def test_an_out_of_memory_split_runs_after_the_failed_attempt_has_freed_its_tensors(
    pipeline: TTSPipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Retrying inside the `except` would keep the traceback, so the failed attempt's tensors, alive
    while the halves need the memory they hold."""
    small = SmallGpu(pipeline.voice.vocoder)
    monkeypatch.setattr(pipeline.voice, "vocoder", small)
    batcher = _batcher(pipeline.synthesize, max_batch=2, max_wait_ms=50)
    audio = _speak_concurrently(batcher, THREE[1:], pipeline)
    assert len(small.failed) == 1 and all(len(wavs[0]) > 1000 for wavs in audio)
    assert small.alive_at_retry == [False, False], "the halves ran while the failed batch's latents were alive"


@pytest.mark.parametrize(
    ("error", "sticky"),
    [
        (RuntimeError("CUDA error: device-side assert triggered\nCompile with TORCH_USE_CUDA_DSA"), True),
        (RuntimeError("CUDA error: an illegal memory access was encountered"), True),  # Xid 13/31
        (RuntimeError("CUDA error: uncorrectable ECC error encountered"), True),  # Xid 48
        (torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
        (RuntimeError("CUDA error: out of memory"), False),
        (RuntimeError("shape '[2, 3]' is invalid for input of size 5"), False),
        (ValueError("CUDA error: not a RuntimeError, not CUDA's"), False),
    ],
)
def test_a_sticky_cuda_error_is_told_from_one_a_retry_may_cure(error: BaseException, sticky: bool) -> None:
    reason = sticky_cuda_error(error)
    assert (reason is not None) == sticky
    if reason is not None:
        assert reason == str(error).splitlines()[0]


def test_a_sticky_cuda_error_wedges_the_batcher_and_fails_its_requests() -> None:
    def asserting(items: list[Item]) -> list[np.ndarray]:
        raise RuntimeError("CUDA error: device-side assert triggered")

    async def scenario() -> Batcher:
        batcher = _batcher(asserting, max_batch=1, max_wait_ms=0)
        batcher.start()
        futures = batcher.submit([_item(5), _item(6)], request_id="r")
        with pytest.raises(RuntimeError, match="device-side assert"):
            await asyncio.gather(*futures)
        await batcher.stop()
        return batcher

    batcher = _run(scenario())
    assert batcher.wedged == "CUDA error: device-side assert triggered"
    assert batcher.requests == set() and batcher.pending == []  # the failed request's second sentence never ran


# ---------------------------------------------------------------------- nothing but synthesis
def test_a_lone_request_does_not_wait_for_company() -> None:
    """max_wait_ms is spent only when requests arrive close together: one on its own starts at once."""

    async def scenario() -> float:
        batcher = _batcher(_fake, max_batch=4, max_wait_ms=2000)
        batcher.start()
        await asyncio.sleep(0)
        start = time.monotonic()
        await asyncio.gather(*batcher.submit([_item(5)]))
        elapsed = time.monotonic() - start
        await batcher.stop()
        return elapsed

    assert _run(scenario()) < 1.0


def test_requests_arriving_close_together_wait_for_each_other() -> None:
    seen: list[list[Item]] = []

    async def scenario() -> None:
        batcher = _batcher(_recording(_fake, seen, delay=0.02), max_batch=4, max_wait_ms=500)
        batcher.start()
        first = batcher.submit([_item(5)])
        await asyncio.sleep(0.001)  # the first runs alone; the second comes right after it: dense
        second = batcher.submit([_item(6)])
        await asyncio.sleep(0.1)  # past the first batch: the worker waits for company for the second
        third = batcher.submit([_item(7)])
        await asyncio.gather(*first, *second, *third)
        await batcher.stop()

    _run(scenario())
    assert [[len(i.ids) for i in batch] for batch in seen] == [[5], [6, 7]]


def test_cpu_workers_synthesise_side_by_side_each_on_a_thread_of_its_own() -> None:
    together = threading.Barrier(2, timeout=10)
    threads: list[tuple[str, int]] = []

    def synthesize(items: list[Item]) -> list[np.ndarray]:
        threads.append((threading.current_thread().name, torch.get_num_threads()))
        together.wait()  # both batches inside synthesis at once, or BrokenBarrierError
        return _fake(items)

    async def scenario() -> None:
        batcher = _batcher(synthesize, max_batch=1, max_wait_ms=0, workers=2, threads=1)
        batcher.start()
        await asyncio.gather(*batcher.submit([_item(5)]), *batcher.submit([_item(6)]))
        await batcher.stop()

    _run(scenario())
    assert sorted(name.rsplit("_", 1)[0] for name, _ in threads) == ["voxscale-synth-0", "voxscale-synth-1"]
    assert all(n == 1 for _, n in threads)


def test_at_low_load_one_worker_does_all_the_work() -> None:
    """One client's requests, one after another, all run on worker 0: taking turns, two workers' malloc
    arenas and intra-op pools each stayed half warm."""
    names: list[str] = []

    def synthesize(items: list[Item]) -> list[np.ndarray]:
        names.append(threading.current_thread().name.rsplit("_", 1)[0])
        return _fake(items)

    async def scenario() -> None:
        batcher = _batcher(synthesize, max_batch=1, max_wait_ms=0, workers=2, threads=1)
        batcher.start()
        for n in range(6):
            await asyncio.gather(*batcher.submit([_item(n + 1)]))
            await asyncio.sleep(0.01)
        await batcher.stop()

    _run(scenario())
    assert names == ["voxscale-synth-0"] * 6, names


def test_the_adaptive_layout_gives_a_lone_request_every_cpu_and_a_crowd_one_each() -> None:
    """VOXSCALE_CPU_THREADS=0 (issue 24): one client's latency is the pipeline's on all cores; several
    requests run side by side on one core each; nothing starts beside a batch given every core."""
    runs: list[tuple[int, int, float, float]] = []  # (ids, threads, start, end)
    together = threading.Barrier(2, timeout=10)

    def synthesize(items: list[Item]) -> list[np.ndarray]:
        start, width = time.monotonic(), torch.get_num_threads()
        if len(items[0].ids) == 7:
            together.wait()  # the crowd's two batches are inside synthesis at once
        else:
            time.sleep(0.1)
        runs.append((len(items[0].ids), width, start, time.monotonic()))
        return _fake(items)

    async def scenario() -> None:
        batcher = _batcher(synthesize, max_batch=1, max_wait_ms=0, workers=2, cpus=2)
        batcher.start()
        lone = batcher.submit([_item(5)])
        await asyncio.sleep(0.03)
        late = batcher.submit([_item(6)])  # arrives while the lone one runs on both cores
        await asyncio.gather(*lone, *late)
        await asyncio.gather(*batcher.submit([_item(7)]), *batcher.submit([_item(7)]))
        await batcher.stop()

    _run(scenario())
    by_ids = {ids: (width, start, end) for ids, width, start, end in runs}
    assert by_ids[5][0] == 2 and by_ids[6][0] == 2, runs  # each alone when it started
    assert by_ids[6][1] >= by_ids[5][2], runs  # waited for the wide batch instead of running beside it
    assert [w for ids, w, _, _ in runs if ids == 7] == [1, 1], runs
