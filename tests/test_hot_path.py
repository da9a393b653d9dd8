"""The request hot path: one espeak-ng call per request, the phoneme and audio caches, batched audio
equal to unbatched, and the batcher's grouping, priorities, request ids and out-of-memory split."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from prometheus_client import CollectorRegistry

from voxscale.inference.batcher import Batcher, Priority, _Job, _Request, plan_batch
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

    with caplog.at_level(logging.DEBUG, logger="voxscale.inference.batcher"):
        _run(scenario())
    debug = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert any("req-ok-1" in m for m in debug), debug
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
