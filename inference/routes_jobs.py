"""Asynchronous speech: POST a speech request, get 202 and a job; poll it; fetch the audio when done."""

from __future__ import annotations

import asyncio

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from voxscale.inference import audio, speech
from voxscale.inference.errors import ApiError
from voxscale.inference.jobs import JobRecord
from voxscale.inference.request_context import Caller, Tenants
from voxscale.inference.routes_voices import require_own_voice
from voxscale.inference.schemas import SpeechRequest
from voxscale.inference.state import ServerState, State

router = APIRouter(prefix="/v1/audio/speech/jobs", tags=["jobs"])


async def _job(state: ServerState, job_id: str) -> JobRecord:
    record = await asyncio.to_thread(state.jobs.store.get, job_id)
    if record is None:
        raise ApiError(
            404,
            f"job_id: no job {job_id!r}; it never existed here or its results expired "
            f"(kept {state.settings.job_ttl_s:g} s, VOXSCALE_JOB_TTL_S)",
            "job_id",
            "job_not_found",
        )
    return record


@router.post("", status_code=202)
async def create_job(
    req: SpeechRequest, request: Request, state: State, caller: Caller, tenancy: Tenants
) -> JSONResponse:
    """Validated and admitted like /v1/audio/speech (4xx and 429 now, not later), then run at batch priority.

    Its characters count against the key's charactersPerDay like a synchronous request's."""
    if req.stream or req.stream_format != "audio":
        param = "stream" if req.stream else "stream_format"
        raise ApiError(422, f"{param}: a job's result is one file; leave out `stream` and `stream_format`", param)
    rid: str = request.state.request_id
    priority = req.priority or "batch"
    with tenancy.characters(caller, len(req.input)):
        if state.serving:  # another key's voice is refused like an unknown one, before it counts as demand
            await require_own_voice(state, caller, req.voice)
        prepared = await speech.prepare(state, req)
        futures = speech.submit(state, prepared.items, priority, rid)
    sample_rate = audio.output_rate(req.response_format, state.pipeline.sample_rate)
    create = state.jobs.create
    try:
        record = await asyncio.to_thread(create, priority, req.response_format, sample_rate, rid, prepared.headers)
    except OSError as exc:  # the server's volume, not the request
        raise ApiError(507, f"job store: cannot write the job ({exc})", None, "job_store_unavailable") from None

    async def encode(wavs: list[np.ndarray]) -> bytes:
        speech.finished(state, wavs, None)
        return await speech.encode(state, wavs, req.response_format)

    state.jobs.start(record, futures, encode)
    location = f"{router.prefix}/{record.id}"
    return JSONResponse(record.public(state.settings.job_ttl_s), status_code=202, headers={"Location": location})


@router.get("/{job_id}")
async def get_job(job_id: str, state: State) -> JSONResponse:
    return JSONResponse((await _job(state, job_id)).public(state.settings.job_ttl_s))


@router.get("/{job_id}/audio")
async def get_job_audio(job_id: str, state: State) -> Response:
    record = await _job(state, job_id)
    if record.status != "done":
        why = f": {record.error}" if record.error else f"; poll GET {router.prefix}/{job_id} until it is done"
        raise ApiError(409, f"job_id: job {job_id!r} is {record.status}{why}", "job_id", "job_not_done")
    body = await asyncio.to_thread(state.jobs.store.audio, job_id)
    if body is None:
        raise ApiError(404, f"job_id: the audio of job {job_id!r} is gone (expired); submit it again", "job_id")
    headers = {**record.headers, "X-Voxscale-Job": record.id}
    return Response(body, media_type=audio.CONTENT_TYPES[record.response_format], headers=headers)
