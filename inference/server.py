"""The HTTP layer: an OpenAI-compatible `/v1/audio/speech`, voices, health, readiness and metrics.

A thin shell: requests are validated here (bad input gets a 4xx naming the field, never a 500),
sentences are phonemised, and the batcher does the synthesis.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, File, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from voxscale import metrics_contract as mc
from voxscale.inference import audio
from voxscale.inference.batcher import Batcher, Draining, QueueFull
from voxscale.inference.openai_compat import (
    OPENAI_MODELS,
    OPENAI_VOICES,
    InstructionReading,
    audio_delta,
    audio_done,
    builtin_for_openai_voice,
    read_instructions,
    stream_error,
)
from voxscale.inference.pipeline import STYLES, Item, TTSPipeline
from voxscale.inference.piper import VoiceLoadError
from voxscale.inference.server_metrics import ServerMetrics, gpu_product
from voxscale.inference.stages import ENV as STAGE_WEIGHTS_ENV
from voxscale.inference.stages import StageWeightsError, parse_stage_weights
from voxscale.inference.voices import VoiceStore, VoiceStoreError, is_voice_id

log = logging.getLogger("voxscale.inference")
MAX_INPUT = 4096
REFERENCE_FILE = File(..., description="A 3-30 s recording of the voice, wav or flac.")
SSE_CHUNK = 32 * 1024  # bytes of audio per speech.audio.delta when a whole file is sent as events
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # proxies must not hold events back


@dataclass(frozen=True)
class Settings:
    """Server settings; in a pod they come from the VOXSCALE_* env the operator sets."""

    voice: str = "en_US-joe-medium"
    precision: str = "fp16"
    max_batch: int = 8  # on CUDA; batching buys nothing on a CPU (measured: it costs), which runs one at a time
    cpu_max_batch: int = 1
    max_wait_ms: float = 10.0
    max_queue: int = 64
    request_timeout_s: float = 120.0
    # How long a SIGTERM may take to answer what was accepted; the operator sets it inside the pod's
    # grace period (operator/children.py drain_seconds), so the kubelet never kills a busy server.
    drain_timeout_s: float = 120.0
    api_token: str | None = None
    device: str | None = None
    voice_store: str | None = None  # a directory shared by the replicas; None keeps voices in memory
    stage_weights: str | None = None  # "stage=path,..." checkpoints over the voice's stages (stages.py)

    @classmethod
    def from_env(cls) -> Settings:
        env = os.environ
        return cls(
            voice=env.get("VOXSCALE_VOICE", cls.voice),
            precision=env.get("VOXSCALE_PRECISION", cls.precision),
            max_batch=int(env.get("VOXSCALE_MAX_BATCH_SIZE", cls.max_batch)),
            cpu_max_batch=int(env.get("VOXSCALE_CPU_MAX_BATCH_SIZE", cls.cpu_max_batch)),
            max_wait_ms=float(env.get("VOXSCALE_MAX_WAIT_MS", cls.max_wait_ms)),
            max_queue=int(env.get("VOXSCALE_MAX_QUEUE", cls.max_queue)),
            request_timeout_s=float(env.get("VOXSCALE_REQUEST_TIMEOUT_S", cls.request_timeout_s)),
            drain_timeout_s=float(env.get("VOXSCALE_DRAIN_TIMEOUT_S", cls.drain_timeout_s)),
            api_token=env.get("VOXSCALE_API_TOKEN") or None,
            device=env.get("VOXSCALE_DEVICE") or None,
            voice_store=env.get("VOXSCALE_VOICE_STORE") or None,
            stage_weights=env.get(STAGE_WEIGHTS_ENV) or None,
        )


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

    @field_validator("voice", mode="before")
    @classmethod
    def _voice_object(cls, voice: object) -> object:
        """OpenAI's custom-voice form {"id": ...} names a registered voice; it is read as that id."""
        if not isinstance(voice, dict):
            return voice
        if set(voice) != {"id"} or not isinstance(voice["id"], str):
            raise ValueError('a voice is a name or an object with one string field, {"id": "vc_..."}')
        return voice["id"]


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str = "invalid_request_error",
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers or {}


def _error(
    status: int, message: str, param: str | None, code: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"message": message, "type": code, "param": param, "code": status}}
    return JSONResponse(body, status_code=status, headers=headers)


class State:
    pipeline: TTSPipeline
    batcher: Batcher
    metrics: ServerMetrics
    ready = False
    draining = False


def create_app(settings: Settings | None = None, preloaded: TTSPipeline | None = None) -> FastAPI:
    """The app; `preloaded` lets tests share one loaded pipeline between several apps."""
    settings = settings or Settings.from_env()
    state = State()
    state.metrics = ServerMetrics.create()
    # Opened before anything loads, so a bad volume fails the start with its path, not the first upload.
    store = VoiceStore(Path(settings.voice_store) if settings.voice_store else None)
    stage_weights = parse_stage_weights(settings.stage_weights)
    if preloaded is None and not store.persistent:
        log.warning("registered voices are kept in memory only; set VOXSCALE_VOICE_STORE to share and keep them")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if preloaded is not None:
            state.pipeline = preloaded
            if store.persistent:
                preloaded.voices = store
        else:
            try:
                state.pipeline = await asyncio.to_thread(
                    TTSPipeline.load, settings.voice, settings.precision, settings.device, store, stage_weights
                )
            except (VoiceLoadError, StageWeightsError) as exc:
                log.error("cannot start: %s", exc)
                raise
        await asyncio.to_thread(state.pipeline.warm_up)
        on_gpu = state.pipeline.device.type == "cuda"
        max_batch = settings.max_batch if on_gpu else settings.cpu_max_batch
        state.batcher = Batcher(
            state.pipeline.synthesize,
            state.metrics,
            max_batch,
            settings.max_wait_ms,
            settings.max_queue,
            gpu_product(state.pipeline.device),
        )
        state.batcher.start()
        state.ready = True
        log.info(
            "ready: voice %s on %s (%s)",
            state.pipeline.voice_name,
            state.pipeline.device,
            str(state.pipeline.dtype).removeprefix("torch."),
        )
        yield
        state.ready = False
        await state.batcher.stop()

    app = FastAPI(title="voxscale TTS server", version="0.1.0", lifespan=lifespan)
    app.state.voxscale = state

    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        state.metrics.counter(mc.ERRORS).labels(exc.code).inc()
        return _error(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if p != "body")
        state.metrics.counter(mc.ERRORS).labels("validation").inc()
        return _error(422, f"{param or 'body'}: {first['msg']}", param or None, "invalid_request_error")

    @app.middleware("http")
    async def request_context(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        request.state.request_id = request_id
        open_paths = ("/healthz", "/readyz", "/metrics")
        authorized = request.headers.get("authorization") == f"Bearer {settings.api_token}"
        if settings.api_token and request.url.path not in open_paths and not authorized:
            headers = {"WWW-Authenticate": "Bearer", "X-Request-Id": request_id}
            return _error(401, "missing or wrong bearer token", None, "authentication_error", headers)
        started = time.monotonic()
        response = await call_next(request)
        response.headers["X-Request-Id"] = request_id
        log.info(
            "%s %s %s %.0fms request_id=%s",
            request.method,
            request.url.path,
            response.status_code,
            1000 * (time.monotonic() - started),
            request_id,
        )
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        if state.ready and not state.draining:
            return JSONResponse({"status": "ready"})
        reason = "draining" if state.draining else "loading the model"
        return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/voices")
    async def list_voices() -> dict[str, Any]:
        p = state.pipeline
        voices: list[dict[str, Any]] = [
            {"id": v, "type": "built-in", "sample_rate": p.sample_rate} for v in p.builtin_voices()
        ]
        voices += [
            {"id": r.voice_id, "type": "registered", "mapped_to": r.mapped_to, "similarity": round(r.similarity, 3)}
            for r in await asyncio.to_thread(p.registered_voices)
        ]
        return {"object": "list", "data": voices}

    @app.post("/v1/voices")
    async def register_voice(file: UploadFile = REFERENCE_FILE) -> JSONResponse:
        data = await file.read()
        try:
            wav, sr = audio.decode(data)
            audio.quality_gate(wav, sr)
        except audio.AudioError as exc:
            raise ApiError(422, f"file: {exc}", "file", "invalid_audio") from None
        try:
            entry, cached = await asyncio.to_thread(state.pipeline.register, wav, sr)
        except VoiceStoreError as exc:  # the server's volume, not the upload: say which and why
            raise ApiError(507, str(exc), None, "voice_store_unavailable") from None
        body = {
            "id": entry.voice_id,
            "object": "voice",
            "cached": cached,
            "mapped_to": entry.mapped_to,
            "similarity": round(entry.similarity, 3),
            "note": f"{state.pipeline.voice_name} is not conditioned on speaker embeddings; this voice is "
            f"rendered with its most similar built-in voice, {entry.mapped_to}",
        }
        return JSONResponse(body, status_code=200 if cached else 201)

    async def _resolve_voice(name: str) -> tuple[int | None, dict[str, str]]:
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
                where = (
                    "in the shared voice store"
                    if p.voices.persistent
                    else "on this replica (voices live in memory: set VOXSCALE_VOICE_STORE to share and keep them)"
                )
                raise ApiError(
                    404,
                    f"voice: no registered voice {name!r} {where}; register the recording again with "
                    "POST /v1/voices (the same recording gets the same id)",
                    "voice",
                    "voice_not_found",
                )
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

    def _check_format(req: SpeechRequest) -> None:
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

    def _scales(req: SpeechRequest, reading: InstructionReading) -> tuple[float, float, float]:
        """VITS' (noise_scale, length_scale, noise_w): the voice's own, then style, speed and overrides."""
        base = state.pipeline.voice.piper.scales
        ns_x, nw_x, len_x = STYLES[req.style or reading.style or "neutral"]
        speed = min(4.0, max(0.25, req.speed * reading.speed))  # instructions nudge speed within the API's range
        return (
            (req.noise_scale if req.noise_scale is not None else float(base.noise_scale)) * ns_x,
            float(base.length_scale) * len_x / speed,
            (req.noise_w if req.noise_w is not None else float(base.noise_w)) * nw_x,
        )

    def _submit(items: list[Item]) -> list[asyncio.Future[np.ndarray]]:
        try:
            return state.batcher.submit(items)
        except QueueFull as exc:
            state.metrics.counter(mc.REQUESTS).labels("429").inc()
            raise ApiError(
                429, str(exc), None, "rate_limit_exceeded", {"Retry-After": f"{exc.retry_after:.0f}"}
            ) from None
        except Draining:
            raise ApiError(
                503, "the server is shutting down; retry on another replica", None, "unavailable", {"Retry-After": "1"}
            ) from None

    def _finished(wavs: list[np.ndarray], started: float) -> None:
        seconds = sum(len(w) for w in wavs) / state.pipeline.sample_rate
        state.metrics.counter(mc.AUDIO_SECONDS).inc(seconds)
        state.metrics.histogram(mc.REQUEST_LATENCY).observe(time.monotonic() - started)
        state.metrics.counter(mc.REQUESTS).labels("200").inc()

    async def _raw_stream(
        futures: list[asyncio.Future[np.ndarray]], encoder: audio.StreamEncoder, started: float
    ) -> AsyncIterator[bytes]:
        """`stream: true`: the file's bytes sentence by sentence; the first leaves before the rest is done."""
        wavs = []
        for fut in futures:
            wavs.append(await asyncio.wait_for(fut, settings.request_timeout_s))
            yield await asyncio.to_thread(encoder.piece, wavs[-1])
        _finished(wavs, started)

    async def _sse_stream(
        futures: list[asyncio.Future[np.ndarray]], encoder: audio.StreamEncoder, items: list[Item], started: float
    ) -> AsyncIterator[bytes]:
        """`stream_format: "sse"`: speech.audio.delta events (one per sentence where the format allows
        it; flac and opus once the file is complete), then speech.audio.done with the usage."""
        p = state.pipeline
        wavs: list[np.ndarray] = []
        try:
            for fut in futures:
                wavs.append(await asyncio.wait_for(fut, settings.request_timeout_s))
                if encoder.incremental:
                    yield audio_delta(await asyncio.to_thread(encoder.piece, wavs[-1]))
        except TimeoutError:
            yield stream_error(f"synthesis took longer than {settings.request_timeout_s:g} s", "timeout")
            return
        if not encoder.incremental:
            whole = await asyncio.to_thread(audio.encode, audio.join(wavs, p.sample_rate), p.sample_rate, encoder.fmt)
            for at in range(0, len(whole), SSE_CHUNK):
                yield audio_delta(whole[at : at + SSE_CHUNK])
        _finished(wavs, started)
        yield audio_done(sum(len(i.ids) for i in items), sum(len(w) for w in wavs) // p.voice.cfg.hop)

    @app.post("/v1/audio/speech")
    async def speech(req: SpeechRequest) -> Response:
        # Demand is counted at the door, before any refusal, so a full queue does not hide it.
        state.metrics.counter(mc.REQUESTS_RECEIVED).inc()
        state.metrics.counter(mc.INPUT_CHARACTERS).inc(len(req.input))
        if not state.ready or state.draining:
            raise ApiError(
                503, "the server is not ready (loading or draining); retry", None, "unavailable", {"Retry-After": "2"}
            )
        _check_format(req)
        speaker, headers = await _resolve_voice(req.voice)
        reading = read_instructions(req.instructions)
        if req.instructions is not None:  # say how they were read: never dropped silently
            headers["X-Voxscale-Instructions"] = reading.header(req.style)
        p = state.pipeline
        items = await asyncio.to_thread(p.prepare, req.input, _scales(req, reading), req.seed, speaker)
        if not items:
            raise ApiError(400, "input: nothing speakable in the text", "input")
        started = time.monotonic()
        futures = _submit(items)
        fmt = req.response_format
        headers["X-Voxscale-Sample-Rate"] = headers["X-Sample-Rate"] = str(audio.output_rate(fmt, p.sample_rate))
        encoder = audio.StreamEncoder(fmt, p.sample_rate)
        if req.stream_format == "sse":
            events = _sse_stream(futures, encoder, items, started)
            return StreamingResponse(events, media_type="text/event-stream", headers={**headers, **SSE_HEADERS})
        media = audio.CONTENT_TYPES[fmt]
        if req.stream:
            return StreamingResponse(_raw_stream(futures, encoder, started), media_type=media, headers=headers)
        try:
            wavs = list(await asyncio.wait_for(asyncio.gather(*futures), settings.request_timeout_s))
        except TimeoutError:
            raise ApiError(
                504, f"synthesis took longer than {settings.request_timeout_s:g} s", None, "timeout"
            ) from None
        _finished(wavs, started)
        body = await asyncio.to_thread(audio.encode, audio.join(wavs, p.sample_rate), p.sample_rate, fmt)
        return Response(body, media_type=media, headers=headers)

    return app


def serve(host: str = "0.0.0.0", port: int = 8000, settings: Settings | None = None) -> None:
    """Run under uvicorn; SIGTERM turns /readyz false, lets accepted requests finish, then exits."""
    import uvicorn

    settings = settings or Settings.from_env()
    app = create_app(settings)
    state: State = app.state.voxscale
    drain_s = settings.drain_timeout_s
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=round(drain_s))
    server = uvicorn.Server(config)

    tasks: list[asyncio.Task[None]] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()

        def drain() -> None:
            async def finish() -> None:
                state.draining = True
                if hasattr(state, "batcher"):
                    state.batcher.draining = True
                    try:
                        await asyncio.wait_for(state.batcher.idle(), drain_s)
                    except TimeoutError:
                        log.warning("drain: work still queued after %gs (VOXSCALE_DRAIN_TIMEOUT_S); exiting", drain_s)
                server.should_exit = True

            tasks.append(loop.create_task(finish()))

        serving = loop.create_task(server.serve())
        await asyncio.sleep(0)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, drain)
        await serving

    asyncio.run(main())
