"""Request bodies: OpenAI's speech request, plus what a TTS user expects on top."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from voxscale.inference.batcher import Priority
from voxscale.inference.openai_compat import OPENAI_MODELS

MAX_INPUT = 4096


class SpeechRequest(BaseModel):
    """OpenAI's speech request, plus what a TTS user expects on top."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(
        "tts-1",
        max_length=128,
        description=f"Accepted for compatibility ({', '.join(OPENAI_MODELS)}, ...); the pod's voice model is used.",
    )
    input: str = Field(..., min_length=1, max_length=MAX_INPUT, description="Text to speak (<= 4096 characters).")
    voice: str = Field(
        "en_US-joe-medium",
        min_length=1,
        max_length=128,
        description="A built-in voice, an OpenAI voice name (rendered with a built-in voice), or a registered "
        'voice id, also in OpenAI\'s custom-voice form {"id": "vc_..."}.',
    )
    instructions: str | None = Field(
        None, max_length=MAX_INPUT, description="Free text; its style and speed words are applied, see the header."
    )
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = Field(1.0, ge=0.25, le=4.0)
    stream_format: Literal["audio", "sse"] = Field(
        "audio", description="audio: the file's bytes; sse: speech.audio.delta events, sentence by sentence."
    )
    stream: bool = False
    noise_scale: float | None = Field(None, ge=0.0, le=2.0, description="Prosody variation (VITS noise scale).")
    noise_w: float | None = Field(None, ge=0.0, le=2.0, description="Duration variation (VITS noise_w).")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="Same seed, same audio.")
    style: Literal["neutral", "calm", "cheerful", "excited", "serious"] | None = Field(
        None, description="A prosody preset; when given it wins over a style read from `instructions`."
    )
    priority: Priority | None = Field(
        None,
        description="realtime (interactive; the default for /v1/audio/speech) is served before batch "
        "(offline generation; the default for /v1/audio/speech/jobs).",
    )

    @field_validator("voice", mode="before")
    @classmethod
    def _voice_object(cls, voice: object) -> object:
        """OpenAI's custom-voice form {"id": ...} names a registered voice; it is read as that id."""
        if not isinstance(voice, dict):
            return voice
        if set(voice) != {"id"} or not isinstance(voice["id"], str):
            raise ValueError('a voice is a name or an object with one string field, {"id": "vc_..."}')
        return voice["id"]
