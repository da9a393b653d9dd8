"""The settings contract: the one place that names the VOXSCALE_* variables the inference server reads.

The operator builds the server's environment from these entries (operator/children.py server_env),
the server's Settings take their names, types and defaults from them (inference/settings.py), and
`voxscale serve` shows them in its help, so a renamed variable or a changed default cannot leave one
side behind. Like metrics_contract.py it is pure data: the operator image reads it without torch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")

_TYPE_NAMES: dict[Callable[[str], Any], str] = {int: "an integer", float: "a number", str: "text"}


class SettingError(ValueError):
    """A VOXSCALE_* variable holds a value the server cannot use; the message names it and the fix."""


@dataclass(frozen=True)
class Setting(Generic[T]):
    """One variable: its name, how its text is read (the type), its default and what it does.

    `field` is the attribute of the server's Settings it fills. Where the operator sets it, `spec_path`
    names the TTSDeployment spec field it comes from, or `pod_field` the pod's own field (downward API).
    """

    env: str
    field: str
    type: Callable[[str], T]
    default: T
    help: str
    spec_path: tuple[str, ...] = ()
    pod_field: str = ""
    choices: tuple[str, ...] = ()
    minimum: float | None = None

    def read(self, env: Mapping[str, str]) -> T:
        """The value in `env`; unset or empty means the default."""
        raw = env.get(self.env, "").strip()
        if not raw:
            return self.default
        if self.choices and raw not in self.choices:
            raise SettingError(f"{self.env}={raw!r}: use one of {', '.join(self.choices)}, or unset it")
        try:
            value = self.type(raw)
        except ValueError:
            raise SettingError(
                f"{self.env}={raw!r}: expected {_TYPE_NAMES.get(self.type, 'text')}; unset it for {self.default!r}"
            ) from None
        if self.minimum is not None and isinstance(value, int | float) and value < self.minimum:
            raise SettingError(f"{self.env}={raw!r}: must be at least {self.minimum:g}")
        return value

    def spec_value(self, full_spec: Mapping[str, Any]) -> Any:
        """The value of `spec_path` in a spec with the CRD's defaults filled in."""
        node: Any = full_spec
        for key in self.spec_path:
            node = node[key]
        return node


VOICE: Setting[str] = Setting(
    "VOXSCALE_VOICE",
    "voice",
    str,
    "en_US-joe-medium",
    "Built-in voice or a path to a Piper voice (.onnx beside its .onnx.json).",
    spec_path=("model", "voice"),
)
PRECISION: Setting[str] = Setting(
    "VOXSCALE_PRECISION",
    "precision",
    str,
    "fp16",
    "Numeric precision on CUDA; the CPU always runs fp32.",
    spec_path=("model", "precision"),
    choices=("fp16", "bf16", "fp32"),
)
DEVICE: Setting[str | None] = Setting(
    "VOXSCALE_DEVICE", "device", str, None, "cuda, cuda:1 or cpu; unset: cuda when available."
)
MAX_BATCH_SIZE: Setting[int] = Setting(
    "VOXSCALE_MAX_BATCH_SIZE",
    "max_batch",
    int,
    8,
    "Largest batch of sentences the dynamic batcher forms on CUDA.",
    spec_path=("model", "maxBatchSize"),
    minimum=1,
)
CPU_MAX_BATCH_SIZE: Setting[int] = Setting(
    "VOXSCALE_CPU_MAX_BATCH_SIZE",
    "cpu_max_batch",
    int,
    1,
    "Largest batch on a CPU, where batching was measured to cost rather than help.",
    minimum=1,
)
CPU_THREADS: Setting[int] = Setting(
    "VOXSCALE_CPU_THREADS",
    "cpu_threads",
    int,
    1,
    "Intra-op threads per synthesis on a CPU: the replica runs CPUs // n syntheses at once (the cgroup "
    "limit counts), each on a thread of its own. 1 measured best on 2 shared CPUs at 1, 4 and 16 clients "
    "(bench/inference_bench.py --layouts): two threads of one synthesis stall whenever anything else runs. "
    "0 (adaptive): a worker per CPU; a batch that is the only work gets every CPU and runs alone, "
    "otherwise each batch gets one CPU.",
    minimum=0,
)
MAX_WAIT_MS: Setting[float] = Setting(
    "VOXSCALE_MAX_WAIT_MS", "max_wait_ms", float, 10.0, "How long a batch waits for company.", minimum=0
)
MAX_QUEUE: Setting[int] = Setting(
    "VOXSCALE_MAX_QUEUE",
    "max_queue",
    int,
    64,
    "Requests that may wait for a batch slot; beyond it the server answers 429 with Retry-After.",
    spec_path=("model", "maxQueueLength"),
    minimum=1,
)
REQUEST_TIMEOUT_S: Setting[float] = Setting(
    "VOXSCALE_REQUEST_TIMEOUT_S",
    "request_timeout_s",
    float,
    120.0,
    "Longest a request's synthesis may take; the operator sets it to the drain time.",
    minimum=0.001,
)
DRAIN_TIMEOUT_S: Setting[float] = Setting(
    "VOXSCALE_DRAIN_TIMEOUT_S",
    "drain_timeout_s",
    float,
    120.0,
    "How long a SIGTERM may take to answer what was accepted; the operator keeps it inside the grace period.",
    minimum=0,
)
API_TOKEN: Setting[str | None] = Setting(
    "VOXSCALE_API_TOKEN",
    "api_token",
    str,
    None,
    "One bearer token for the API (not probes or /metrics): the API key `default`, an admin without quotas.",
)
API_KEYS: Setting[str | None] = Setting(
    "VOXSCALE_API_KEYS",
    "api_keys",
    str,
    None,
    "API keys file (YAML/JSON: key id -> sha256 or key, admin, requestsPerMinute, charactersPerDay) or a "
    "directory of them, e.g. a mounted Secret; each key sees only its own voices. See inference/tenants.py.",
)
VOICE_STORE: Setting[str | None] = Setting(
    "VOXSCALE_VOICE_STORE",
    "voice_store",
    str,
    None,
    "Directory shared by the replicas for registered voices and job results; unset: this process's memory.",
)
STAGE_WEIGHTS: Setting[str | None] = Setting(
    "VOXSCALE_STAGE_WEIGHTS", "stage_weights", str, None, "stage=path,... state_dicts over the voice's stages."
)
PORT: Setting[int] = Setting(
    "VOXSCALE_PORT", "port", int, 8000, "The HTTP port.", spec_path=("service", "port"), minimum=1
)
POD_NAME: Setting[str | None] = Setting(
    "VOXSCALE_POD_NAME",
    "pod_name",
    str,
    None,
    "This pod, named in log lines and job records.",
    pod_field="metadata.name",
)
POD_NAMESPACE: Setting[str | None] = Setting(
    "VOXSCALE_POD_NAMESPACE",
    "pod_namespace",
    str,
    None,
    "This pod's namespace, named in log lines and job records.",
    pod_field="metadata.namespace",
)
JOB_TTL_S: Setting[float] = Setting(
    "VOXSCALE_JOB_TTL_S",
    "job_ttl_s",
    float,
    3600.0,
    "How long an asynchronous speech job's record and audio are kept after its last change.",
    minimum=1,
)
MAX_UPLOAD_BYTES: Setting[int] = Setting(
    "VOXSCALE_MAX_UPLOAD_BYTES",
    "max_upload_bytes",
    int,
    16 * 1024 * 1024,
    "Largest reference recording POST /v1/voices reads; a longer upload is cut off with 413.",
    minimum=1,
)

SETTINGS: tuple[Setting[Any], ...] = (
    VOICE,
    PRECISION,
    DEVICE,
    MAX_BATCH_SIZE,
    CPU_MAX_BATCH_SIZE,
    CPU_THREADS,
    MAX_WAIT_MS,
    MAX_QUEUE,
    REQUEST_TIMEOUT_S,
    DRAIN_TIMEOUT_S,
    API_TOKEN,
    API_KEYS,
    VOICE_STORE,
    STAGE_WEIGHTS,
    PORT,
    POD_NAME,
    POD_NAMESPACE,
    JOB_TTL_S,
    MAX_UPLOAD_BYTES,
)
