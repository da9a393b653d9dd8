"""The server's settings, named, typed and defaulted by voxscale/settings_contract.py (never retyped here)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from voxscale import settings_contract as sc


@dataclass(frozen=True)
class Settings:
    """Server settings; in a pod they come from the VOXSCALE_* env the operator sets."""

    voice: str = sc.VOICE.default
    precision: str = sc.PRECISION.default
    device: str | None = sc.DEVICE.default
    max_batch: int = sc.MAX_BATCH_SIZE.default
    cpu_max_batch: int = sc.CPU_MAX_BATCH_SIZE.default
    cpu_threads: int = sc.CPU_THREADS.default
    max_wait_ms: float = sc.MAX_WAIT_MS.default
    max_queue: int = sc.MAX_QUEUE.default
    request_timeout_s: float = sc.REQUEST_TIMEOUT_S.default
    drain_timeout_s: float = sc.DRAIN_TIMEOUT_S.default
    api_token: str | None = field(default=sc.API_TOKEN.default, repr=False)  # a secret: never in a log line
    api_keys: str | None = sc.API_KEYS.default
    voice_store: str | None = sc.VOICE_STORE.default
    stage_weights: str | None = sc.STAGE_WEIGHTS.default
    port: int = sc.PORT.default
    pod_name: str | None = sc.POD_NAME.default
    pod_namespace: str | None = sc.POD_NAMESPACE.default
    job_ttl_s: float = sc.JOB_TTL_S.default
    max_upload_bytes: int = sc.MAX_UPLOAD_BYTES.default

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        """Every contract variable read from `env` (the process's by default); SettingError names a bad one."""
        source = os.environ if env is None else env
        return cls(**{s.field: s.read(source) for s in sc.SETTINGS})

    @property
    def pod(self) -> str | None:
        """namespace/name of the pod this server runs in, when the operator said so."""
        if not self.pod_name:
            return None
        return f"{self.pod_namespace}/{self.pod_name}" if self.pod_namespace else self.pod_name


def usable_cpus(cgroup_cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 quota (a pod's CPU limit)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    try:
        quota, period = cgroup_cpu_max.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.floor(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return max(1, cpus)


def cpu_layout(threads: int, cpus: int) -> tuple[int, int | None, int | None]:
    """(synthesis workers, intra-op threads per worker, CPUs to share) on a CPU for VOXSCALE_CPU_THREADS.

    0 (adaptive): a worker per CPU; a batch that is the only work gets every CPU (batcher.py);
    n >= 1: cpus // n workers of n threads each."""
    if threads <= 0:
        return cpus, None, cpus
    return max(1, cpus // threads), threads, None
