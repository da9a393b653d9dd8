"""Audio in and out: decoding uploads, the reference-recording quality gate, and response encodings."""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

MIN_REFERENCE_S, MAX_REFERENCE_S = 3.0, 30.0
SILENCE_DBFS = -45.0
CLIPPED_FRACTION = 0.005

CONTENT_TYPES = {
    "wav": "audio/wav",
    "pcm": "audio/L16",
    "flac": "audio/flac",
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
}
_SF_FORMATS = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}


class AudioError(ValueError):
    """A problem with an uploaded recording; the message is what the client is told."""


def supported_formats() -> list[str]:
    """wav and pcm always; flac, mp3 and opus when this libsndfile can write them."""
    out = ["wav", "pcm"]
    available = sf.available_formats()
    for name, (fmt, sub) in _SF_FORMATS.items():
        if fmt in available and sub in sf.available_subtypes(fmt):
            out.append(name)
    return out


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the sample rate of an uploaded wav/flac/ogg file."""
    if not data:
        raise AudioError("the file is empty")
    try:
        wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"not a readable audio file (wav or flac expected): {exc}") from None
    return wav.mean(axis=1), int(sr)


def quality_gate(wav: np.ndarray, sr: int) -> None:
    """Refuse recordings that would make a poor speaker embedding, saying why."""
    seconds = len(wav) / sr
    if seconds < MIN_REFERENCE_S:
        raise AudioError(
            f"too short: {seconds:.1f} s; a reference recording needs {MIN_REFERENCE_S:g}-"
            f"{MAX_REFERENCE_S:g} s of speech"
        )
    if seconds > MAX_REFERENCE_S:
        raise AudioError(f"too long: {seconds:.1f} s; trim it to at most {MAX_REFERENCE_S:g} s")
    rms = float(np.sqrt(np.mean(np.square(wav)))) if len(wav) else 0.0
    dbfs = 20 * np.log10(max(rms, 1e-10))
    if dbfs < SILENCE_DBFS:
        raise AudioError(f"silent: the level is {dbfs:.0f} dBFS (below {SILENCE_DBFS:g}); record closer to the mic")
    clipped = float(np.mean(np.abs(wav) >= 0.999))
    if clipped > CLIPPED_FRACTION:
        raise AudioError(f"clipped: {100 * clipped:.1f} % of samples at full scale; lower the input gain")


def to_pcm16(wav: np.ndarray) -> bytes:
    return (np.clip(wav, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def wav_header(sample_rate: int, n_bytes: int = 0xFFFFFFFF - 36) -> bytes:
    """A 16-bit mono WAV header; the default size marks a stream of unknown length."""
    return (
        b"RIFF"
        + struct.pack("<I", min(36 + n_bytes, 0xFFFFFFFF))
        + b"WAVEfmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, sample_rate, sample_rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", n_bytes)
    )


def encode(wav: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    if fmt == "pcm":
        return to_pcm16(wav)
    if fmt == "wav":
        pcm = to_pcm16(wav)
        return wav_header(sample_rate, len(pcm)) + pcm
    container, subtype = _SF_FORMATS[fmt]
    if fmt == "opus" and sample_rate not in (8000, 12000, 16000, 24000, 48000):
        wav, sample_rate = _resample(wav, sample_rate, 24000), 24000  # Opus' own rates only
    buf = io.BytesIO()
    sf.write(buf, np.clip(wav, -1, 1), sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def _resample(wav: np.ndarray, orig: int, new: int) -> np.ndarray:
    positions = np.arange(int(len(wav) * new / orig)) * (orig / new)
    return np.interp(positions, np.arange(len(wav)), wav).astype(np.float32)
