"""Stage 1: a GE2E-style speaker encoder producing a 256-d embedding from reference audio.

The network (3-layer LSTM over 40-band mel frames, a linear layer, ReLU, L2 norm) and its trained
weights come from the Resemblyzer package's `pretrained.pt`; this module is our own code that loads
them. Contract: waveform [S] float at 16 kHz -> embedding [256], unit length.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from voxscale.inference.stages import load_stage_weights

SAMPLE_RATE = 16_000
N_MELS = 40
WINDOW = 400  # 25 ms
HOP = 160  # 10 ms
PARTIAL_FRAMES = 160  # 1.6 s per partial utterance
EMBEDDING = 256


def _hz_to_mel(f: Tensor) -> Tensor:
    """Slaney mel scale (linear below 1 kHz, logarithmic above)."""
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(f >= min_log_hz, min_log_mel + torch.log(f / min_log_hz) / logstep, f / f_sp)


def _mel_to_hz(m: Tensor) -> Tensor:
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, math.log(6.4) / 27.0
    return torch.where(m >= min_log_mel, min_log_hz * torch.exp(logstep * (m - min_log_mel)), f_sp * m)


def mel_filterbank(n_fft: int = WINDOW, n_mels: int = N_MELS, sr: int = SAMPLE_RATE) -> Tensor:
    """Slaney-normalised triangular filters [n_mels, n_fft//2+1]."""
    freqs = torch.linspace(0, sr / 2, n_fft // 2 + 1, dtype=torch.float64)
    mels = torch.linspace(
        float(_hz_to_mel(torch.tensor(0.0))), float(_hz_to_mel(torch.tensor(sr / 2.0))), n_mels + 2, dtype=torch.float64
    )
    edges = _mel_to_hz(mels)
    lower = (freqs[None, :] - edges[:-2, None]) / (edges[1:-1] - edges[:-2])[:, None]
    upper = (edges[2:, None] - freqs[None, :]) / (edges[2:] - edges[1:-1])[:, None]
    fb = torch.clamp(torch.minimum(lower, upper), min=0)
    return (fb * (2.0 / (edges[2:] - edges[:-2]))[:, None]).float()


class SpeakerEncoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lstm = nn.LSTM(N_MELS, EMBEDDING, num_layers=3, batch_first=True)
        self.linear = nn.Linear(EMBEDDING, EMBEDDING)
        self.register_buffer("mel_fb", mel_filterbank())
        self.register_buffer("window", torch.hann_window(WINDOW))

    def mel_frames(self, wav: Tensor) -> Tensor:
        """[S] -> [frames, 40] power mel spectrogram."""
        window, fb = self.get_buffer("window"), self.get_buffer("mel_fb")
        spec = torch.stft(wav, n_fft=WINDOW, hop_length=HOP, window=window, center=True, return_complex=True)
        return (fb @ spec.abs().pow(2)).T

    def embed_frames(self, frames: Tensor) -> Tensor:
        """[B, 160, 40] mel partials -> [B, 256] unit embeddings."""
        _, (hidden, _) = self.lstm(frames)
        return F.normalize(torch.relu(self.linear(hidden[-1])), dim=1)

    @torch.inference_mode()
    def forward(self, wav: Tensor) -> Tensor:
        """[S] at 16 kHz -> [256]: the mean of 1.6 s partials (50 % overlap), renormalised."""
        frames = self.mel_frames(wav)
        if frames.shape[0] < PARTIAL_FRAMES:
            frames = F.pad(frames, (0, 0, 0, PARTIAL_FRAMES - frames.shape[0]))
        step = PARTIAL_FRAMES // 2
        starts = range(0, max(frames.shape[0] - PARTIAL_FRAMES, 0) + 1, step)
        partials = torch.stack([frames[s : s + PARTIAL_FRAMES] for s in starts])
        return F.normalize(self.embed_frames(partials).mean(0), dim=0)


def resemblyzer_weights() -> Path:
    """The pretrained GE2E weights shipped in the Resemblyzer wheel (found without importing it)."""
    spec = importlib.util.find_spec("resemblyzer")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the Resemblyzer package is not installed (pip install --no-deps Resemblyzer)")
    return Path(next(iter(spec.submodule_search_locations))) / "pretrained.pt"


def load_speaker_encoder(path: Path | None = None) -> SpeakerEncoder:
    """The GE2E encoder with Resemblyzer's weights, or with your own checkpoint of the same architecture."""
    enc = SpeakerEncoder()
    load_stage_weights("speaker_encoder", enc, path or resemblyzer_weights())
    return enc.eval()


def resample(wav: Tensor, orig_sr: int, new_sr: int) -> Tensor:
    """Band-limited resampling by FFT (no extra dependency); [S] -> [S * new/orig]."""
    if orig_sr == new_sr:
        return wav
    n = round(wav.shape[-1] * new_sr / orig_sr)
    spec = torch.fft.rfft(wav)
    keep = min(spec.shape[-1], n // 2 + 1)
    out = torch.zeros(n // 2 + 1, dtype=spec.dtype)
    out[:keep] = spec[:keep]
    result: Tensor = torch.fft.irfft(out, n=n) * (n / wav.shape[-1])
    return result
