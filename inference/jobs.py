"""Asynchronous speech jobs: accepted now (202), synthesised at batch priority, fetched later.

A job's record and audio live in the shared store directory (`jobs/` under VOXSCALE_VOICE_STORE) when
there is one, so a client may poll any replica; otherwise in this process's memory. Both expire
VOXSCALE_JOB_TTL_S after the job's last change and are then removed. A replica that dies mid-job
leaves its record queued or running until it expires: the client sees no progress and resubmits.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import numpy as np

from voxscale.inference.voices import write_atomically

log = logging.getLogger("voxscale.inference")

JOB_ID = re.compile(r"job_[0-9a-f]{32}")
Status = Literal["queued", "running", "done", "failed"]
Clock = Callable[[], float]


def is_job_id(name: str) -> bool:
    return JOB_ID.fullmatch(name) is not None


@dataclass(frozen=True)
class JobRecord:
    """What a poll answers; `updated_at` (epoch seconds) starts the TTL again at each change."""

    id: str
    status: Status
    created_at: float
    updated_at: float
    priority: str
    response_format: str
    sample_rate: int
    request_id: str
    headers: dict[str, str]
    pod: str | None = None
    error: str | None = None

    def public(self, ttl_s: float) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.id,
            "object": "speech.job",
            "status": self.status,
            "created_at": int(self.created_at),
            "expires_at": int(self.updated_at + ttl_s),
            "priority": self.priority,
            "response_format": self.response_format,
            "request_id": self.request_id,
            "pod": self.pod,
        }
        if self.status == "done":
            body["audio_url"] = f"/v1/audio/speech/jobs/{self.id}/audio"
        if self.error is not None:
            body["error"] = self.error
        return body


class JobStore:
    """Records and audio by job id: files in a directory shared by replicas, or a dict in memory."""

    def __init__(self, directory: Path | None, ttl_s: float, clock: Clock = time.time) -> None:
        self.directory, self.ttl_s, self.clock = directory, ttl_s, clock
        self._memory: dict[str, tuple[JobRecord, bytes | None]] = {}
        self._lock = threading.Lock()
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def _files(self, job_id: str) -> tuple[Path, Path]:
        assert self.directory is not None and is_job_id(job_id)
        return self.directory / f"{job_id}.json", self.directory / f"{job_id}.audio"

    def put(self, record: JobRecord, audio: bytes | None = None) -> None:
        """Keep the record (and its audio); the audio is written first, so `done` always has its file."""
        if self.directory is None:
            with self._lock:
                kept = self._memory.get(record.id, (record, None))[1]
                self._memory[record.id] = (record, audio if audio is not None else kept)
            return
        meta, data = self._files(record.id)
        if audio is not None:
            write_atomically(data, audio)
        write_atomically(meta, json.dumps(asdict(record)).encode())

    def get(self, job_id: str) -> JobRecord | None:
        """The record; None when unknown, unreadable or expired (an expired job is removed on sight)."""
        if not is_job_id(job_id):
            return None
        record = self._read(job_id)
        if record is not None and self._expired(record):
            self.delete(job_id)
            return None
        return record

    def _read(self, job_id: str) -> JobRecord | None:
        if self.directory is None:
            with self._lock:
                entry = self._memory.get(job_id)
            return entry[0] if entry else None
        try:
            return JobRecord(**json.loads(self._files(job_id)[0].read_text()))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, TypeError) as exc:
            log.warning("job store: unreadable record %s (%s)", job_id, exc)
            return None

    def audio(self, job_id: str) -> bytes | None:
        if self.directory is None:
            with self._lock:
                entry = self._memory.get(job_id)
            return entry[1] if entry else None
        try:
            return self._files(job_id)[1].read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, job_id: str) -> None:
        if self.directory is None:
            with self._lock:
                self._memory.pop(job_id, None)
            return
        for path in self._files(job_id):
            path.unlink(missing_ok=True)

    def _expired(self, record: JobRecord) -> bool:
        return self.clock() >= record.updated_at + self.ttl_s

    def sweep(self) -> int:
        """Remove every expired job (any replica's, with a directory); returns how many went."""
        if self.directory is None:
            with self._lock:
                ids = list(self._memory)
        else:
            ids = [p.stem for p in self.directory.glob("job_*.json") if is_job_id(p.stem)]
        gone = 0
        for job_id in ids:
            record = self._read(job_id)
            if record is not None and self._expired(record):
                self.delete(job_id)
                gone += 1
        return gone


class JobRunner:
    """Creates jobs, follows their synthesis in tasks of their own and writes each change to the store."""

    def __init__(self, store: JobStore, pod: str | None, timeout_s: float) -> None:
        self.store, self.pod, self.timeout_s = store, pod, timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    def create(
        self, priority: str, response_format: str, sample_rate: int, request_id: str, headers: dict[str, str]
    ) -> JobRecord:
        now = self.store.clock()
        record = JobRecord(
            id=f"job_{uuid.uuid4().hex}",
            status="queued",
            created_at=now,
            updated_at=now,
            priority=priority,
            response_format=response_format,
            sample_rate=sample_rate,
            request_id=request_id,
            headers=headers,
            pod=self.pod,
        )
        self.store.put(record)
        return record

    def start(
        self,
        record: JobRecord,
        futures: list[asyncio.Future[np.ndarray]],
        encode: Callable[[list[np.ndarray]], Awaitable[bytes]],
    ) -> None:
        task = asyncio.get_running_loop().create_task(self._run(record, futures, encode))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _update(self, record: JobRecord, audio: bytes | None = None, **change: Any) -> JobRecord:
        new = replace(record, updated_at=self.store.clock(), **change)
        await asyncio.to_thread(self.store.put, new, audio)
        return new

    async def _run(
        self,
        record: JobRecord,
        futures: list[asyncio.Future[np.ndarray]],
        encode: Callable[[list[np.ndarray]], Awaitable[bytes]],
    ) -> None:
        """queued until its first sentence is synthesised, running until the audio is stored, then done."""
        try:
            async with asyncio.timeout(self.timeout_s):
                wavs = [await futures[0]]
                record = await self._update(record, status="running")
                wavs += [await f for f in futures[1:]]
                audio = await encode(wavs)
            await self._update(record, audio, status="done")
            log.info("job %s done", record.id)
        except TimeoutError:
            await self._fail(record, f"synthesis took longer than {self.timeout_s:g} s (VOXSCALE_REQUEST_TIMEOUT_S)")
        except asyncio.CancelledError:
            await asyncio.shield(self._fail(record, "the server stopped before the job finished; submit it again"))
            raise
        except Exception as exc:
            log.exception("job %s failed", record.id)
            await self._fail(record, f"synthesis failed: {exc}")

    async def _fail(self, record: JobRecord, error: str) -> None:
        with contextlib.suppress(OSError):
            await self._update(record, status="failed", error=error)

    async def idle(self) -> None:
        """Until every job this replica runs has its outcome stored (used while draining)."""
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def sweep_forever(self, every_s: float) -> None:
        """Expired jobs are removed even when nobody asks for them again."""
        while True:
            gone = await asyncio.to_thread(self.store.sweep)
            if gone:
                log.info("job store: removed %d expired job(s)", gone)
            await asyncio.sleep(every_s)
