"""Probes and metrics: open without a token, so the kubelet and Prometheus need no secret."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from voxscale.inference.state import ServerState, State

router = APIRouter(tags=["health"])


def wedged(state: ServerState) -> str | None:
    """Why the GPU can serve nothing until the process restarts (a sticky CUDA error), else None."""
    batcher = getattr(state, "batcher", None)  # none while the model loads
    return batcher.wedged if batcher is not None else None


@router.get("/healthz")
async def healthz(state: State) -> JSONResponse:
    """Fails on a sticky CUDA error: only a restart brings the device back, so liveness asks for one."""
    if (reason := wedged(state)) is not None:
        return JSONResponse({"status": "wedged", "reason": f"restart needed: {reason}"}, status_code=503)
    return JSONResponse({"status": "alive"})


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    if (reason := wedged(state)) is not None:
        return JSONResponse({"status": "not ready", "reason": f"GPU wedged: {reason}"}, status_code=503)
    if state.serving:
        return JSONResponse({"status": "ready"})
    reason = "draining" if state.draining else "loading the model"
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    if state.nvml is not None:  # GPU gauges are read when scraped, so they are never older than the scrape
        await asyncio.to_thread(state.nvml.refresh)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
