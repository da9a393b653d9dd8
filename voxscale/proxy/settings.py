"""The door sidecar's settings: one place for its VOXSCALE_PROXY_* variables, flags and defaults.

Built from the settings contract's `Setting` (same reading and the same error messages as the
server's variables), pure data like it, so the operator can build the sidecar's environment from
these entries without importing aiohttp. `voxscale proxy` shows each variable in its flag's help.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from voxscale.settings_contract import Setting

LISTEN: Setting[str] = Setting(
    "VOXSCALE_PROXY_LISTEN", "listen", str, "0.0.0.0:8081", "HOST:PORT the door listens on (the Service's target)."
)
UPSTREAM: Setting[str] = Setting(
    "VOXSCALE_PROXY_UPSTREAM", "upstream", str, "127.0.0.1:8000", "HOST:PORT of the TTS server in the same pod."
)
HEALTH_PATH: Setting[str] = Setting(
    "VOXSCALE_PROXY_HEALTH_PATH",
    "health_path",
    str,
    "",
    "The server's own health path (e.g. /health), polled for readiness; unset: ready once the server's "
    "port accepts a connection or a request succeeds.",
)
CONCURRENCY: Setting[int] = Setting(
    "VOXSCALE_PROXY_CONCURRENCY",
    "concurrency",
    int,
    4,
    "Requests sent to the server at once; the rest wait at the door.",
    minimum=1,
)
QUEUE: Setting[int] = Setting(
    "VOXSCALE_PROXY_QUEUE",
    "queue",
    int,
    64,
    "Requests that may wait for a slot; beyond it the door answers 429 with Retry-After.",
    minimum=0,
)
METRICS_PORT: Setting[int] = Setting(
    "VOXSCALE_PROXY_METRICS_PORT",
    "metrics_port",
    int,
    9091,
    "Port of the door's own endpoints: /metrics, /ready (readiness probe), /live.",
    minimum=1,
)
GPU_PRODUCT: Setting[str] = Setting(
    "VOXSCALE_PROXY_GPU_PRODUCT",
    "gpu_product",
    str,
    "unknown",
    "The gpu_product label of busy seconds and completions: the node's nvidia.com/gpu.product, so capacity "
    "is learnt per kind of GPU (the downward API cannot read node labels; set it per node pool).",
)
REQUEST_TIMEOUT_S: Setting[float] = Setting(
    "VOXSCALE_PROXY_REQUEST_TIMEOUT_S",
    "request_timeout_s",
    float,
    300.0,
    "Longest the server may stay silent (before its answer, or between two chunks of it): 504, or the answer "
    "is cut off.",
    minimum=0.001,
)
DRAIN_QUIET_S: Setting[float] = Setting(
    "VOXSCALE_PROXY_DRAIN_QUIET_S",
    "drain_quiet_s",
    float,
    3.0,
    "After SIGTERM the door reports not ready and keeps accepting until no request came for this long "
    "(endpoints take a moment to drop the pod), then closes its port.",
    minimum=0,
)
DRAIN_TIMEOUT_S: Setting[float] = Setting(
    "VOXSCALE_PROXY_DRAIN_TIMEOUT_S",
    "drain_timeout_s",
    float,
    120.0,
    "Longest a SIGTERM waits for accepted requests to finish; keep it inside the pod's grace period.",
    minimum=0,
)

PROXY_SETTINGS: tuple[Setting[Any], ...] = (
    LISTEN,
    UPSTREAM,
    HEALTH_PATH,
    CONCURRENCY,
    QUEUE,
    METRICS_PORT,
    GPU_PRODUCT,
    REQUEST_TIMEOUT_S,
    DRAIN_QUIET_S,
    DRAIN_TIMEOUT_S,
)


@dataclass(frozen=True)
class ProxySettings:
    listen: str = LISTEN.default
    upstream: str = UPSTREAM.default
    health_path: str = HEALTH_PATH.default
    concurrency: int = CONCURRENCY.default
    queue: int = QUEUE.default
    metrics_port: int = METRICS_PORT.default
    gpu_product: str = GPU_PRODUCT.default
    request_timeout_s: float = REQUEST_TIMEOUT_S.default
    drain_quiet_s: float = DRAIN_QUIET_S.default
    drain_timeout_s: float = DRAIN_TIMEOUT_S.default

    @classmethod
    def from_env(cls, env: Mapping[str, str], **overrides: Any) -> ProxySettings:
        """The variables in `env`, then the flags given (None: not given) on top; raises SettingError."""
        values = {s.field: s.read(env) for s in PROXY_SETTINGS}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def replace(self, **changes: Any) -> ProxySettings:
        return dataclasses.replace(self, **changes)
