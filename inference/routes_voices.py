"""Registered voices: list, register a reference recording, delete (a voiceprint is biometric data)."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from voxscale.inference import audio
from voxscale.inference.errors import ApiError, not_ready
from voxscale.inference.pipeline import TTSPipeline
from voxscale.inference.speech import voices_live
from voxscale.inference.state import ServerState, State
from voxscale.inference.uploads import read_file_field
from voxscale.inference.voices import VoiceStoreError

router = APIRouter(tags=["voices"])

UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "A 3-30 s recording of the voice, wav or flac (at most "
                            "VOXSCALE_MAX_UPLOAD_BYTES).",
                        }
                    },
                }
            }
        },
    }
}


def _pipeline(state: ServerState) -> TTSPipeline:
    if not state.ready:
        raise not_ready()
    return state.pipeline


def _store_failed(exc: VoiceStoreError) -> ApiError:
    """The server's volume, not the request, is at fault: say which and why."""
    return ApiError(507, str(exc), None, "voice_store_unavailable")


@router.get("/v1/voices")
async def list_voices(state: State) -> dict[str, Any]:
    p = _pipeline(state)
    voices: list[dict[str, Any]] = [
        {"id": v, "type": "built-in", "sample_rate": p.sample_rate} for v in p.builtin_voices()
    ]
    voices += [
        {"id": r.voice_id, "type": "registered", "mapped_to": r.mapped_to, "similarity": round(r.similarity, 3)}
        for r in await asyncio.to_thread(p.registered_voices)
    ]
    return {"object": "list", "data": voices}


def _decode_checked(data: bytes) -> tuple[np.ndarray, int]:
    """The upload decoded and through the quality gate (raises AudioError naming the problem)."""
    wav, sr = audio.decode(data)
    audio.quality_gate(wav, sr)
    return wav, sr


@router.post("/v1/voices", openapi_extra=UPLOAD_BODY)
async def register_voice(request: Request, state: State) -> JSONResponse:
    p = _pipeline(state)
    data = await read_file_field(request, "file", state.settings.max_upload_bytes)
    try:
        wav, sr = await asyncio.to_thread(_decode_checked, data)  # decoding stalls /readyz if run inline
    except audio.AudioError as exc:
        raise ApiError(422, f"file: {exc}", "file", "invalid_audio") from None
    try:
        entry, cached = await asyncio.to_thread(p.register, wav, sr)
    except VoiceStoreError as exc:
        raise _store_failed(exc) from None
    body = {
        "id": entry.voice_id,
        "object": "voice",
        "cached": cached,
        "mapped_to": entry.mapped_to,
        "similarity": round(entry.similarity, 3),
        "note": f"{p.voice_name} is not conditioned on speaker embeddings; this voice is "
        f"rendered with its most similar built-in voice, {entry.mapped_to}",
    }
    return JSONResponse(body, status_code=200 if cached else 201)


@router.delete("/v1/voices/{voice_id}", status_code=204)
async def delete_voice(voice_id: str, state: State) -> Response:
    """Remove the voiceprint from this replica's memory and the shared store; later lookups get 404."""
    p = _pipeline(state)
    try:
        deleted = await asyncio.to_thread(p.voices.delete, voice_id)
    except VoiceStoreError as exc:
        raise _store_failed(exc) from None
    if not deleted:
        raise ApiError(
            404,
            f"voice_id: no registered voice {voice_id!r} {voices_live(state)}; GET /v1/voices lists them",
            "voice_id",
            "voice_not_found",
        )
    return Response(status_code=204)
