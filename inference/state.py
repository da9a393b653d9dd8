"""What the routers share: one ServerState per app, handed to each endpoint as a dependency."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from voxscale.inference.batcher import Batcher
from voxscale.inference.jobs import JobRunner
from voxscale.inference.pipeline import TTSPipeline
from voxscale.inference.server_metrics import NvmlGauges, ServerMetrics
from voxscale.inference.settings import Settings
from voxscale.inference.voices import VoiceStore


@dataclass
class ServerState:
    """Built before the app starts; pipeline, batcher and jobs exist once the lifespan has loaded the model."""

    settings: Settings
    metrics: ServerMetrics
    store: VoiceStore
    pipeline: TTSPipeline = field(init=False)
    batcher: Batcher = field(init=False)
    jobs: JobRunner = field(init=False)
    nvml: NvmlGauges | None = None
    ready: bool = False
    draining: bool = False

    @property
    def serving(self) -> bool:
        return self.ready and not self.draining


async def get_state(request: Request) -> ServerState:
    """async: FastAPI runs a plain `def` dependency on a worker thread, a hop per request for a lookup."""
    state: ServerState = request.app.state.voxscale
    return state


State = Annotated[ServerState, Depends(get_state)]
