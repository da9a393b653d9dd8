"""Probes and metrics: open without a token, so the kubelet and Prometheus need no secret."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from voxscale.inference.state import State

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "alive"}


@router.get("/readyz")
async def readyz(state: State) -> JSONResponse:
    if state.serving:
        return JSONResponse({"status": "ready"})
    reason = "draining" if state.draining else "loading the model"
    return JSONResponse({"status": "not ready", "reason": reason}, status_code=503)


@router.get("/metrics")
async def metrics(state: State) -> Response:
    if state.nvml is not None:  # GPU gauges are read when scraped, so they are never older than the scrape
        await asyncio.to_thread(state.nvml.refresh)
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
