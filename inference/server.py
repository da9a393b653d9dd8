"""The TTS server's assembly: settings, stores, the model's lifespan and the routers; and `serve()`.

The HTTP surface lives in the routes_* modules (speech, jobs, voices, health), the work behind it in
services without HTTP (speech.py, jobs.py, voices.py); bad input gets a 4xx naming the field, never a 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI

from voxscale import settings_contract as sc
from voxscale.inference import routes_health, routes_jobs, routes_speech, routes_voices
from voxscale.inference.batcher import Batcher
from voxscale.inference.errors import install_handlers
from voxscale.inference.jobs import JobRunner, JobStore
from voxscale.inference.pipeline import TTSPipeline
from voxscale.inference.piper import VoiceLoadError
from voxscale.inference.request_context import Tenancy, configure_logging, install_middleware
from voxscale.inference.server_metrics import NvmlGauges, ServerMetrics, gpu_product
from voxscale.inference.settings import Settings, cpu_layout, usable_cpus
from voxscale.inference.stages import StageWeightsError, parse_stage_weights
from voxscale.inference.state import ServerState
from voxscale.inference.voices import VoiceStore

__all__ = ["Settings", "create_app", "serve"]

log = logging.getLogger("voxscale.inference")
JOB_SWEEP_S = 60.0  # at most this late, an expired job's files go (a GET of it never sees it past its TTL)


def _job_store(settings: Settings) -> JobStore:
    """Jobs beside the voices on the shared volume when there is one, so any replica answers a poll."""
    directory = Path(settings.voice_store) / "jobs" if settings.voice_store else None
    return JobStore(directory, settings.job_ttl_s)


async def _load(state: ServerState, preloaded: TTSPipeline | None, stage_weights: dict[str, Path]) -> None:
    """The model (or the tests' shared one), warmed up, behind a running batcher and job runner."""
    settings = state.settings
    if preloaded is not None:
        state.pipeline = preloaded
        if state.store.persistent:
            preloaded.voices = state.store
    else:
        try:
            state.pipeline = await asyncio.to_thread(
                TTSPipeline.load,
                settings.voice,
                settings.precision,
                settings.device,
                state.store,
                stage_weights,
            )
        except (VoiceLoadError, StageWeightsError, sc.SettingError) as exc:  # bf16 on a GPU without it
            log.error("cannot start: %s", exc)
            raise
    await asyncio.to_thread(state.pipeline.warm_up)
    on_gpu = state.pipeline.device.type == "cuda"
    workers, threads, cpus = (1, None, None) if on_gpu else cpu_layout(settings.cpu_threads, usable_cpus())
    each = f"{threads} intra-op thread(s) each" if threads else f"{cpus} CPUs shared among the running ones"
    log.info("synthesis: %d worker(s), %s", workers, each if not on_gpu else "on the GPU")
    state.batcher = Batcher(
        state.pipeline.synthesize,
        state.metrics,
        settings.max_batch if on_gpu else settings.cpu_max_batch,
        settings.max_wait_ms,
        settings.max_queue,
        gpu_product(state.pipeline.device),
        workers=workers,
        threads=threads,
        cpus=cpus,
    )
    state.batcher.start()
    state.nvml = NvmlGauges.start(state.metrics) if on_gpu else None
    state.jobs = JobRunner(_job_store(settings), settings.pod, settings.request_timeout_s)


def create_app(settings: Settings | None = None, preloaded: TTSPipeline | None = None) -> FastAPI:
    """The app; `preloaded` lets tests share one loaded pipeline between several apps."""
    settings = settings or Settings.from_env()
    # Opened before anything loads, so a bad volume fails the start with its path, not the first upload.
    store = VoiceStore(Path(settings.voice_store) if settings.voice_store else None)
    stage_weights = parse_stage_weights(settings.stage_weights)
    if preloaded is None and not store.persistent:
        log.warning("registered voices are kept in memory only; set VOXSCALE_VOICE_STORE to share and keep them")
    state = ServerState(settings, ServerMetrics.create(), store)
    tenancy = Tenancy.create(settings, state.metrics.registry)  # a bad keys file fails the start, naming it

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await _load(state, preloaded, stage_weights)
        sweeper = asyncio.create_task(state.jobs.sweep_forever(min(JOB_SWEEP_S, settings.job_ttl_s)))
        state.ready = True
        p = state.pipeline
        log.info("ready: voice %s on %s (%s)", p.voice_name, p.device, str(p.dtype).removeprefix("torch."))
        yield
        state.ready = False
        sweeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sweeper
        await state.jobs.stop()
        await state.batcher.stop()
        if state.nvml is not None:
            state.nvml.close()

    app = FastAPI(title="voxscale TTS server", version="0.1.0", lifespan=lifespan)
    app.state.voxscale = state
    install_handlers(app, state.metrics)
    install_middleware(app, settings, tenancy)
    for module in (routes_health, routes_voices, routes_speech, routes_jobs):
        app.include_router(module.router)
    return app


def serve(host: str = "0.0.0.0", port: int | None = None, settings: Settings | None = None) -> None:
    """Run under uvicorn; SIGTERM turns /readyz false, lets accepted requests and jobs finish, then exits."""
    import uvicorn

    settings = settings or Settings.from_env()
    configure_logging(settings)
    app = create_app(settings)
    state: ServerState = app.state.voxscale
    drain_s = settings.drain_timeout_s
    port = settings.port if port is None else port
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=round(drain_s))
    server = uvicorn.Server(config)
    tasks: list[asyncio.Task[None]] = []

    async def finish() -> None:
        state.draining = True
        if hasattr(state, "batcher"):
            state.batcher.draining = True
            try:
                await asyncio.wait_for(_accepted_work_done(state), drain_s)
            except TimeoutError:
                log.warning("drain: work still queued after %gs (VOXSCALE_DRAIN_TIMEOUT_S); exiting", drain_s)
        server.should_exit = True

    async def main() -> None:
        loop = asyncio.get_running_loop()
        serving = loop.create_task(server.serve())
        await asyncio.sleep(0)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: tasks.append(loop.create_task(finish())))
        await serving

    asyncio.run(main())


async def _accepted_work_done(state: ServerState) -> None:
    """Every accepted request synthesised and every job's outcome stored."""
    await state.batcher.idle()
    if hasattr(state, "jobs"):
        await state.jobs.idle()
