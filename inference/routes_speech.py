"""OpenAI's `/v1/audio/speech`: one file, the file streamed sentence by sentence, or SSE events.

The input's characters are charged to the caller's charactersPerDay before anything is admitted and
given back if the request is refused before it reaches the batcher (request_context.Tenancy).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from voxscale.inference import audio, speech
from voxscale.inference.errors import ApiError
from voxscale.inference.openai_compat import audio_delta, audio_done, stream_error
from voxscale.inference.pipeline import Item
from voxscale.inference.request_context import Caller, Tenants
from voxscale.inference.routes_voices import require_own_voice
from voxscale.inference.schemas import SpeechRequest
from voxscale.inference.state import ServerState, State

router = APIRouter(tags=["speech"])

SSE_CHUNK = 32 * 1024  # bytes of audio per speech.audio.delta when a whole file is sent as events
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not hold events back

Futures = list[asyncio.Future[np.ndarray]]


async def _raw_stream(
    state: ServerState, futures: Futures, encoder: audio.StreamEncoder, started: float
) -> AsyncIterator[bytes]:
    """`stream: true`: the file's bytes sentence by sentence; the first leaves before the rest is done."""
    wavs = []
    with speech.outcome(state, started):
        for fut in futures:
            wavs.append(await asyncio.wait_for(fut, state.settings.request_timeout_s))
            yield await speech.encode_piece(encoder, wavs[-1])
    speech.finished(state, wavs, started)


async def _sse_stream(
    state: ServerState, futures: Futures, encoder: audio.StreamEncoder, items: list[Item], started: float
) -> AsyncIterator[bytes]:
    """`stream_format: "sse"`: speech.audio.delta events (one per sentence where the format allows
    it; flac and opus once the file is complete), then speech.audio.done with the usage."""
    timeout = state.settings.request_timeout_s
    wavs: list[np.ndarray] = []
    try:
        with speech.outcome(state, started):
            for fut in futures:
                wavs.append(await asyncio.wait_for(fut, timeout))
                if encoder.incremental:
                    yield audio_delta(await speech.encode_piece(encoder, wavs[-1]))
    except TimeoutError:
        yield stream_error(f"synthesis took longer than {timeout:g} s", "timeout")
        return
    if not encoder.incremental:
        whole = await speech.encode(state, wavs, encoder.fmt)
        for at in range(0, len(whole), SSE_CHUNK):
            yield audio_delta(whole[at : at + SSE_CHUNK])
    speech.finished(state, wavs, started)
    yield audio_done(sum(len(i.ids) for i in items), sum(len(w) for w in wavs) // state.pipeline.voice.cfg.hop)


@router.post("/v1/audio/speech")
async def create_speech(
    req: SpeechRequest, request: Request, state: State, caller: Caller, tenancy: Tenants
) -> Response:
    with tenancy.characters(caller, len(req.input)):
        if state.serving:  # another key's voice is refused like an unknown one, before it counts as demand
            await require_own_voice(state, caller, req.voice)
        prepared = await speech.prepare(state, req)
        started = time.monotonic()
        futures = speech.submit(state, prepared.items, req.priority or "realtime", request.state.request_id)
    fmt, headers = req.response_format, prepared.headers
    encoder = audio.StreamEncoder(fmt, state.pipeline.sample_rate)
    if req.stream_format == "sse":
        events = _sse_stream(state, futures, encoder, prepared.items, started)
        return StreamingResponse(events, media_type="text/event-stream", headers={**headers, **SSE_HEADERS})
    media = audio.CONTENT_TYPES[fmt]
    if req.stream:
        return StreamingResponse(_raw_stream(state, futures, encoder, started), media_type=media, headers=headers)
    timeout = state.settings.request_timeout_s
    try:
        with speech.outcome(state, started):
            wavs = await speech.wait_for_audio(futures, timeout, request.receive)
    except TimeoutError:
        raise ApiError(504, f"synthesis took longer than {timeout:g} s", None, "timeout") from None
    speech.finished(state, wavs, started)
    return Response(await speech.encode(state, wavs, fmt), media_type=media, headers=headers)
