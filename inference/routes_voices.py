"""Registered voices: list, register a reference recording, delete (a voiceprint is biometric data).

Each voice belongs to the API key that registered it: a key lists, uses and deletes only its own, an
admin key every one (tenants.may_see). Another key's voice answers exactly as a voice that does not
exist (404, same message), so a key cannot learn which voices, or whose recordings, others hold.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from voxscale.inference import audio
from voxscale.inference.errors import ApiError, not_ready
from voxscale.inference.pipeline import RegisteredVoice, TTSPipeline
from voxscale.inference.request_context import Caller, Tenants
from voxscale.inference.speech import unknown_registered_voice, voices_live
from voxscale.inference.state import ServerState, State
from voxscale.inference.tenants import ApiKey, may_see
from voxscale.inference.uploads import read_file_field
from voxscale.inference.voices import StoredVoice, VoiceStoreError, is_voice_id, voice_id_for

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


def visible_voice(p: TTSPipeline, caller: ApiKey, voice_id: str) -> StoredVoice | None:
    """The stored voice if `caller` may see it; None, as for an unknown id, when it is another key's."""
    stored = p.voices.get(voice_id)
    return stored if stored is not None and may_see(caller, stored.owner) else None


async def require_own_voice(state: ServerState, caller: ApiKey, name: str) -> None:
    """A speech request naming a registered voice the caller may not use gets the unknown voice's 404.

    Checked before speech.prepare counts the request as demand, with the same 404 as a missing voice,
    so another key's voice and a missing one are refused, counted and worded the same."""
    if is_voice_id(name) and await asyncio.to_thread(visible_voice, state.pipeline, caller, name) is None:
        raise unknown_registered_voice(state, name, "voice")


def _listed(p: TTSPipeline, caller: ApiKey) -> list[dict[str, Any]]:
    """The registered voices `caller` may see, each with its owner (None: registered before keys)."""
    listed = []
    for voice_id in p.voices.ids():
        stored, entry = visible_voice(p, caller, voice_id), p.registered_voice(voice_id)
        if stored is not None and entry is not None:
            mapping = {"mapped_to": entry.mapped_to, "similarity": round(entry.similarity, 3)}
            listed.append({"id": voice_id, "type": "registered", "owner": stored.owner, **mapping})
    return listed


@router.get("/v1/voices")
async def list_voices(state: State, caller: Caller) -> dict[str, Any]:
    """The built-in voices and the registered ones this key may see (an admin key: all of them)."""
    p = _pipeline(state)
    voices: list[dict[str, Any]] = [
        {"id": v, "type": "built-in", "sample_rate": p.sample_rate} for v in p.builtin_voices()
    ]
    voices += await asyncio.to_thread(_listed, p, caller)
    return {"object": "list", "data": voices}


def register_owned(p: TTSPipeline, wav: np.ndarray, sr: int, owner: str | None, admin: bool) -> tuple[str, bool]:
    """The recording's voice id for `owner` and whether it was already there; stored when it was not.

    An admin re-registering a recording stored before keys gets that voice back (it sees it anyway), so
    a deployment that only had VOXSCALE_API_TOKEN (the admin `default`) keeps its ids."""
    voice_id = voice_id_for(wav, sr, owner)
    known = p.voices.get(voice_id)
    if known is not None and known.owner == owner:
        return voice_id, True
    if admin and owner is not None:
        legacy_id = voice_id_for(wav, sr, None)
        legacy = p.voices.get(legacy_id)
        if legacy is not None and legacy.owner is None:
            return legacy_id, True
    if known is not None:  # a 64-bit hash collision between owners: never overwrite another's voice
        raise VoiceStoreError(f"voice store: id {voice_id} is taken by another key's voice; cannot register this one")
    p.voices.put(StoredVoice(voice_id, p.embed(wav, sr), len(wav) / sr, owner))
    return voice_id, False


def _register(p: TTSPipeline, wav: np.ndarray, sr: int, owner: str | None, admin: bool) -> tuple[RegisteredVoice, bool]:
    voice_id, cached = register_owned(p, wav, sr, owner, admin)
    entry = p.registered_voice(voice_id)
    if entry is None:  # deleted through another replica between the two lines
        raise ApiError(409, f"voice {voice_id} was deleted while it was registered; register it again", "file")
    return entry, cached


def _decode_checked(data: bytes) -> tuple[np.ndarray, int]:
    """The upload decoded and through the quality gate (raises AudioError naming the problem)."""
    wav, sr = audio.decode(data)
    audio.quality_gate(wav, sr)
    return wav, sr


@router.post("/v1/voices", openapi_extra=UPLOAD_BODY)
async def register_voice(request: Request, state: State, caller: Caller, tenancy: Tenants) -> JSONResponse:
    """The voice, owned by the caller's key; the same recording by the same key gets the same id (200)."""
    p = _pipeline(state)
    data = await read_file_field(request, "file", state.settings.max_upload_bytes)
    try:
        wav, sr = await asyncio.to_thread(_decode_checked, data)  # decoding stalls /readyz if run inline
    except audio.AudioError as exc:
        raise ApiError(422, f"file: {exc}", "file", "invalid_audio") from None
    try:
        entry, cached = await asyncio.to_thread(_register, p, wav, sr, tenancy.owner(caller), caller.admin)
    except VoiceStoreError as exc:
        raise _store_failed(exc) from None
    body = {
        "id": entry.voice_id,
        "object": "voice",
        "owner": tenancy.owner(caller),
        "cached": cached,
        "mapped_to": entry.mapped_to,
        "similarity": round(entry.similarity, 3),
        "note": f"{p.voice_name} is not conditioned on speaker embeddings; this voice is "
        f"rendered with its most similar built-in voice, {entry.mapped_to}",
    }
    return JSONResponse(body, status_code=200 if cached else 201)


def _delete_visible(p: TTSPipeline, caller: ApiKey, voice_id: str) -> bool:
    """Delete the voice if the caller may see it; False, as for an unknown id, when it is another key's."""
    return visible_voice(p, caller, voice_id) is not None and p.voices.delete(voice_id)


@router.delete("/v1/voices/{voice_id}", status_code=204)
async def delete_voice(voice_id: str, state: State, caller: Caller) -> Response:
    """Remove the voiceprint from this replica's memory and the shared store; later lookups get 404.

    Only the key that registered it, or an admin key, may; for any other it does not exist."""
    p = _pipeline(state)
    try:
        deleted = await asyncio.to_thread(_delete_visible, p, caller, voice_id)
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
