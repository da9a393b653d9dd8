"""NVIDIA Triton (the tritonserver inside the nvidia-pytriton wheel) serving Piper as a Python model
on the CPU: the `triton` metric profile's server (image: Dockerfile.triton).

Model `piper`: input `text` (BYTES, one string per request), output `audio` (INT16 PCM at the voice's
sample rate). Triton batches requests (up to MAX_BATCH); its own /metrics on :8002 are what voxscale
reads (spec.metrics.profile: triton). Ports: HTTP 8000, gRPC 8001, metrics 8002.
"""

from __future__ import annotations

import os
import pathlib
import signal
import sys

import numpy as np
from piper import PiperVoice
from pytriton.decorators import batch
from pytriton.model_config import ModelConfig, Tensor
from pytriton.triton import Triton, TritonConfig

VOICE = pathlib.Path(os.environ.get("PIPER_VOICE", "/voices/en_US-joe-medium.onnx"))
MODEL = os.environ.get("TRITON_MODEL", "piper")
MAX_BATCH = int(os.environ.get("TRITON_MAX_BATCH", "4"))


def main() -> None:
    # As PID 1 nothing would end it on SIGTERM: leave `with Triton` (which stops the server) at once.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    voice = PiperVoice.load(str(VOICE))

    @batch
    def synthesize(text: np.ndarray) -> dict[str, np.ndarray]:
        """One waveform per request of the batch, zero-padded to the longest (Triton needs one array)."""
        waves = []
        for row in text:
            words = row[0].decode() if isinstance(row[0], bytes) else str(row[0])
            pcm = b"".join(chunk.audio_int16_bytes for chunk in voice.synthesize(words))
            waves.append(np.frombuffer(pcm, dtype=np.int16))
        out = np.zeros((len(waves), max(len(w) for w in waves)), dtype=np.int16)
        for i, wave in enumerate(waves):
            out[i, : len(wave)] = wave
        return {"audio": out}

    config = TritonConfig(http_address="0.0.0.0", grpc_address="0.0.0.0", metrics_address="0.0.0.0")
    with Triton(config=config, workspace=os.environ.get("PYTRITON_WORKSPACE", "/tmp/pytriton")) as triton:
        triton.bind(
            model_name=MODEL,
            infer_func=synthesize,
            inputs=[Tensor(name="text", dtype=bytes, shape=(1,))],
            outputs=[Tensor(name="audio", dtype=np.int16, shape=(-1,))],
            config=ModelConfig(max_batch_size=MAX_BATCH),
        )
        triton.serve()


if __name__ == "__main__":
    main()
