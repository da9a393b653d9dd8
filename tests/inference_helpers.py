"""Shared fixtures for the inference server tests: one loaded pipeline, real server subprocesses."""

from __future__ import annotations

import contextlib
import io
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import requests
import soundfile as sf
import torch

from voxscale.inference.pipeline import TTSPipeline
from voxscale.inference.speaker import resample
from voxscale.localcluster.harness import free_port


@dataclass
class ServerProcess:
    """`voxscale serve` as a pod runs it, on a loopback port."""

    port: int
    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, log_dir: Path, **env: str) -> ServerProcess:
        port = free_port()
        log = log_dir / f"server-{port}.log"
        full_env = dict(os.environ, VOXSCALE_DEVICE="cpu", **env)
        with log.open("wb") as fh:
            proc = subprocess.Popen(
                [sys.executable, "-m", "voxscale.cli", "serve", "--host", "127.0.0.1", "--port", str(port)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=full_env,
            )
        server = cls(port, proc, log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited: {log.read_text()[-3000:]}")
            try:
                if requests.get(f"{server.url}/readyz", timeout=1).status_code == 200:
                    return server
            except requests.RequestException:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server not ready: {log.read_text()[-3000:]}")

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def wav_bytes(wav: np.ndarray, sr: int) -> bytes:
    """16-bit PCM wav, as a user's recording arrives."""
    buf = io.BytesIO()
    sf.write(buf, wav, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def reference_recording(pipeline: TTSPipeline, text: str) -> bytes:
    """Real speech (our own voice's, resampled to 16 kHz) as a user would upload it."""
    wav = np.concatenate(pipeline.synthesize(pipeline.prepare(text, (0.667, 1.0, 0.8), seed=3)))
    return wav_bytes(resample(torch.from_numpy(wav), 22050, 16000).numpy() * 0.8, 16000)


@contextlib.contextmanager
def held(pipeline: TTSPipeline) -> Iterator[None]:
    """Synthesis held for the block: every batch that starts meanwhile waits at its start until the end."""
    gate, real = threading.Lock(), pipeline._synthesize_batch

    def gated(items: list[Any]) -> list[np.ndarray]:
        with gate:
            return real(items)

    with gate:
        pipeline._synthesize_batch = gated  # type: ignore[method-assign]
        try:
            yield
        finally:
            del pipeline._synthesize_batch
