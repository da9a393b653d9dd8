"""The speech service: from a validated request to admitted sentences, and from audio to accounting.

HTTP-free so the synchronous endpoint and the jobs share it: every refusal is an ApiError naming the
field, raised before any synthesis is spent, and demand is counted at the door. Audio nobody waits for
any more (past the timeout, or the client gone) is cancelled, so the batcher never synthesises it.

What the autoscaler reads from here must not lie: demand counts only requests that could be served
(a malformed one buys no GPU), and every admitted request's end is counted and timed, failures and
timeouts included (a fleet where every request fails must not read as fast, or as idle).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from voxscale import metrics_contract as mc
from voxscale.inference import audio
from voxscale.inference.batcher import Draining, Priority, QueueFull
from voxscale.inference.errors import ApiError, not_ready
from voxscale.inference.openai_compat import (
    OPENAI_VOICES,
    InstructionReading,
    builtin_for_openai_voice,
    read_instructions,
)
from voxscale.inference.pipeline import STYLES, Item
from voxscale.inference.schemas import SpeechRequest
from voxscale.inference.state import ServerState
from voxscale.inference.voices import is_voice_id

Receive = Callable[[], Awaitable[Mapping[str, Any]]]  # an ASGI receive: tells when the client has gone
CLIENT_GONE = 499  # nginx's "client closed request": logged and counted, never read by anyone


@dataclass(frozen=True)
class Prepared:
    """A request turned into sentences, with the headers that say how it was read."""

    items: list[Item]
    headers: dict[str, str]


async def prepare(state: ServerState, req: SpeechRequest) -> Prepared:
    """Refuse what cannot be served (format, voice, nothing to say), then count the demand.

    Counted before admission, so a full queue (429) does not hide demand, and a replica not ready
    (503) counts what it turns away; a malformed request (400, 404, 422) is not demand: more GPUs
    would not serve it, and counting it would let cheap invalid requests buy them."""
    if not state.serving:
        received(state, req)
        state.metrics.counter(mc.REQUESTS).labels("503").inc()
        raise not_ready()
    check_format(req)
    speaker, headers = await resolve_voice(state, req.voice)
    reading = read_instructions(req.instructions)
    if req.instructions is not None:  # say how they were read: never dropped silently
        headers["X-Voxscale-Instructions"] = reading.header(req.style)
    p = state.pipeline
    if p.phonemised(req.input):  # no espeak-ng to run: not worth a thread hop
        items = p.prepare(req.input, scales(state, req, reading), req.seed, speaker)
    else:
        items = await asyncio.to_thread(p.prepare, req.input, scales(state, req, reading), req.seed, speaker)
    if not items:
        raise ApiError(400, "input: nothing speakable in the text", "input")
    rate = str(audio.output_rate(req.response_format, p.sample_rate))
    headers["X-Voxscale-Sample-Rate"] = headers["X-Sample-Rate"] = rate
    received(state, req)
    return Prepared(items, headers)


def received(state: ServerState, req: SpeechRequest) -> None:
    """Count a request that could be served at the door: the demand the autoscaler sizes for."""
    state.metrics.counter(mc.REQUESTS_RECEIVED).inc()
    state.metrics.counter(mc.INPUT_CHARACTERS).inc(len(req.input))


async def resolve_voice(state: ServerState, name: str) -> tuple[int | None, dict[str, str]]:
    """The speaker id to render `name` with, and headers saying which voice that is."""
    p = state.pipeline
    builtins = p.builtin_voices()
    headers: dict[str, str] = {}
    alias = builtin_for_openai_voice(name, builtins)
    if alias is not None:  # OpenAI's voice names select one of the pod's voices
        headers["X-Voxscale-Voice-Mapped"] = f"{name} -> {alias}"
        name = alias
    if is_voice_id(name):
        entry = await asyncio.to_thread(p.registered_voice, name)
        if entry is None:
            raise unknown_registered_voice(state, name, "voice")
        headers["X-Voxscale-Voice-Mapped"] = f"{name} -> {entry.mapped_to} (similarity {entry.similarity:.2f})"
        name = entry.mapped_to
    if name not in builtins:
        raise ApiError(
            404,
            f"voice: unknown voice {name!r}; built-in voices: {', '.join(builtins)}, "
            f"OpenAI's voice names ({', '.join(OPENAI_VOICES)}), "
            "or a registered voice id (vc_..., see GET /v1/voices)",
            "voice",
            "voice_not_found",
        )
    headers["X-Voxscale-Voice"] = name
    speaker = p.voice.piper.speaker_id_map.get(name.split(":", 1)[1]) if ":" in name else None
    return speaker, headers


def voices_live(state: ServerState) -> str:
    """Where a registered voice was looked for, for 404s that say so."""
    if state.pipeline.voices.persistent:
        return "in the shared voice store"
    return "on this replica (voices live in memory: set VOXSCALE_VOICE_STORE to share and keep them)"


def unknown_registered_voice(state: ServerState, name: str, param: str) -> ApiError:
    """A 404 that says where the voice was looked for and how to get it back."""
    return ApiError(
        404,
        f"{param}: no registered voice {name!r} {voices_live(state)}; register the recording again with "
        "POST /v1/voices (the same recording gets the same id)",
        param,
        "voice_not_found",
    )


def check_format(req: SpeechRequest) -> None:
    """Refuse what cannot be encoded before any synthesis is spent on it."""
    if req.response_format not in audio.supported_formats():
        raise ApiError(422, audio.unsupported_message(req.response_format), "response_format", "unsupported_format")
    if req.stream and req.stream_format == "audio" and req.response_format not in audio.StreamEncoder.INCREMENTAL:
        raise ApiError(
            400,
            f"response_format: streaming raw audio supports {', '.join(audio.StreamEncoder.INCREMENTAL)}; "
            'for flac or opus drop `stream`, or use stream_format="sse"',
            "response_format",
        )


def scales(state: ServerState, req: SpeechRequest, reading: InstructionReading) -> tuple[float, float, float]:
    """VITS' (noise_scale, length_scale, noise_w): the voice's own, then style, speed and overrides."""
    base = state.pipeline.voice.piper.scales
    ns_x, nw_x, len_x = STYLES[req.style or reading.style or "neutral"]
    speed = min(4.0, max(0.25, req.speed * reading.speed))  # instructions nudge speed within the API's range
    return (
        (req.noise_scale if req.noise_scale is not None else float(base.noise_scale)) * ns_x,
        float(base.length_scale) * len_x / speed,
        (req.noise_w if req.noise_w is not None else float(base.noise_w)) * nw_x,
    )


def submit(
    state: ServerState, items: list[Item], priority: Priority, request_id: str
) -> list[asyncio.Future[np.ndarray]]:
    """Admit the sentences to the batcher, or answer 429 (queue full) / 503 (draining) with Retry-After."""
    try:
        return state.batcher.submit(items, priority=priority, request_id=request_id)
    except QueueFull as exc:
        state.metrics.counter(mc.REQUESTS).labels("429").inc()
        raise ApiError(429, str(exc), None, "rate_limit_exceeded", {"Retry-After": f"{exc.retry_after:.0f}"}) from None
    except Draining:
        state.metrics.counter(mc.REQUESTS).labels("503").inc()
        raise ApiError(
            503, "the server is shutting down; retry on another replica", None, "unavailable", {"Retry-After": "1"}
        ) from None


async def wait_for_audio(
    futures: list[asyncio.Future[np.ndarray]], timeout: float, receive: Receive
) -> list[np.ndarray]:
    """Every sentence's audio, like `wait_for(gather(...), timeout)` (TimeoutError past it), and an
    ApiError 499 once the client has gone.

    Either way the sentences are cancelled, which withdraws the request from the batcher: under
    overload the replica's compute goes to requests someone still waits for."""
    sentences = asyncio.gather(*futures)
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        done, _ = await asyncio.wait((sentences, gone), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        sentences.cancel()  # a no-op once every sentence is done
    if sentences in done:
        return list(sentences.result())
    if gone in done:
        raise ApiError(CLIENT_GONE, "the client closed the connection before its audio was ready", None, "client_gone")
    raise TimeoutError


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has gone: with the body read, the next ASGI message is the disconnect."""
    while (await receive())["type"] != "http.disconnect":
        await asyncio.sleep(0.1)  # a server that answers with empty bodies instead must not make this spin


def finished(state: ServerState, wavs: list[np.ndarray], started: float | None) -> None:
    """Count a request's audio and outcome; its latency too when `started` (jobs wait on purpose: not theirs)."""
    seconds = sum(len(w) for w in wavs) / state.pipeline.sample_rate
    state.metrics.counter(mc.AUDIO_SECONDS).inc(seconds)
    ended(state, 200, started)


def ended(state: ServerState, code: int, started: float | None) -> None:
    """Count an admitted request's outcome, and time it when `started`: a failure or a timeout is
    timed like a success (the time until it ended), so p95 over a failing fleet is not its few successes."""
    if started is not None:
        state.metrics.histogram(mc.REQUEST_LATENCY).observe(time.monotonic() - started)
    state.metrics.counter(mc.REQUESTS).labels(str(code)).inc()


@contextmanager
def outcome(state: ServerState, started: float) -> Iterator[None]:
    """Counts and times an admitted request that does not end with its audio: 504 past the timeout,
    499 when the client went, 500 when synthesis failed (the success is counted by `finished`)."""
    try:
        yield
    except TimeoutError:
        ended(state, 504, started)
        raise
    except ApiError as exc:
        ended(state, exc.status, started)
        raise
    except (asyncio.CancelledError, GeneratorExit):  # a stream's client went mid-answer
        ended(state, CLIENT_GONE, started)
        raise
    except Exception:
        ended(state, 500, started)
        raise


INLINE_ENCODE_SAMPLES = 60 * 22_050  # wav up to ~a minute encodes in ~1 ms: cheaper than a thread hop


async def encode(state: ServerState, wavs: list[np.ndarray], fmt: str) -> bytes:
    """The sentences joined into one file; wav of ordinary length on the event loop, the rest on a thread."""
    rate = state.pipeline.sample_rate
    if fmt == "wav" and sum(len(w) for w in wavs) <= INLINE_ENCODE_SAMPLES:
        return audio.encode(audio.join(wavs, rate), rate, fmt)
    return await asyncio.to_thread(audio.encode, audio.join(wavs, rate), rate, fmt)


async def encode_piece(encoder: audio.StreamEncoder, wav: np.ndarray) -> bytes:
    """A stream's next piece: wav on the event loop (a header and a cast), pcm and mp3 on a thread."""
    if encoder.fmt == "wav" and len(wav) <= INLINE_ENCODE_SAMPLES:
        return encoder.piece(wav)
    return await asyncio.to_thread(encoder.piece, wav)
