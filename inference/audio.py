"""Audio in and out: decoding uploads, the reference-recording quality gate, and response encodings."""

from __future__ import annotations

import functools
import io
import struct
from typing import Any

import numpy as np
import soundfile as sf
import torch

from voxscale.inference.speaker import resample

MIN_REFERENCE_S, MAX_REFERENCE_S = 3.0, 30.0
# What a reference recording may be before a sample is decoded: 30 s of 96 kHz stereo is 23 MB of
# float32. FLAC silence compresses ~2000x, so an upload's size says nothing about what it decodes to.
MAX_UPLOAD_RATE, MAX_UPLOAD_CHANNELS = 96_000, 2
SILENCE_DBFS = -45.0
CLIPPED_FRACTION = 0.005

PCM_RATE = 24_000  # OpenAI's `pcm`: raw 24 kHz 16-bit little-endian mono; clients assume the rate
PAUSE_S = 0.15  # silence between sentences, in whole files and streams alike
CONTENT_TYPES = {
    "mp3": "audio/mpeg",
    "opus": "audio/ogg; codecs=opus",
    "aac": "audio/aac",
    "flac": "audio/flac",
    "wav": "audio/wav",
    "pcm": f"audio/pcm;rate={PCM_RATE};encoding=s16le;channels=1",
}
FORMATS: tuple[str, ...] = tuple(CONTENT_TYPES)  # every format the API names, supported here or not
_SF_FORMATS = {"flac": ("FLAC", "PCM_16"), "mp3": ("MP3", "MPEG_LAYER_III"), "opus": ("OGG", "OPUS")}
_OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


class AudioError(ValueError):
    """A problem with an uploaded recording; the message is what the client is told."""


@functools.cache
def _writable() -> tuple[str, ...]:
    """What this libsndfile can write, asked once (asking costs ~1 ms: it lists every format)."""
    out = ["wav", "pcm"]
    available = sf.available_formats()
    for name, (fmt, sub) in _SF_FORMATS.items():
        if fmt in available and sub in sf.available_subtypes(fmt):
            out.append(name)
    return tuple(out)


def supported_formats() -> list[str]:
    """wav and pcm always; flac, mp3 and opus when this libsndfile can write them.

    Never aac: libsndfile has no AAC encoder and the image ships no ffmpeg, so asking for it gets a
    422 listing these instead of a half-working fallback.
    """
    return list(_writable())


def unsupported_message(fmt: str) -> str:
    """Why `fmt` cannot be produced here and what to ask for instead (the 422 a client sees)."""
    why = "no AAC encoder is installed (libsndfile has none)" if fmt == "aac" else "this libsndfile cannot write it"
    return f"response_format: {fmt} is not available here: {why}; use one of {', '.join(supported_formats())}"


def output_rate(fmt: str, sample_rate: int) -> int:
    """The sample rate of the audio a client receives in `fmt` from a model running at `sample_rate`."""
    if fmt == "pcm":
        return PCM_RATE
    if fmt == "opus" and sample_rate not in _OPUS_RATES:
        return 24000
    return sample_rate


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the sample rate of an uploaded wav/flac/ogg file, decoding at most
    MAX_REFERENCE_S of it: the rate, channels and length are checked from the header first, and the
    read itself stops one frame past the limit (a header may understate the length or not state it)."""
    if not data:
        raise AudioError("the file is empty")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels = int(f.samplerate), int(f.channels)
            _check_header(rate, channels, f.frames)
            limit = int(MAX_REFERENCE_S * rate)
            wav = f.read(frames=limit + 1, dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as exc:
        raise AudioError(f"not a readable audio file (wav or flac expected): {exc}") from None
    if len(wav) > limit:
        raise AudioError(f"too long: more than {MAX_REFERENCE_S:g} s; trim it to at most {MAX_REFERENCE_S:g} s")
    return wav.mean(axis=1), rate


def _check_header(rate: int, channels: int, frames: int) -> None:
    """Refuse from the header alone what would decode to too much (or to nothing sensible)."""
    if not 8_000 <= rate <= MAX_UPLOAD_RATE:
        raise AudioError(f"sample rate {rate} Hz: send 8000-{MAX_UPLOAD_RATE} Hz (16-48 kHz is usual for speech)")
    if not 1 <= channels <= MAX_UPLOAD_CHANNELS:
        raise AudioError(f"{channels} channels: send mono or stereo (mix the recording down)")
    if frames / rate > MAX_REFERENCE_S:
        raise AudioError(f"too long: {frames / rate:.1f} s; trim it to at most {MAX_REFERENCE_S:g} s")


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


def join(wavs: list[np.ndarray], sample_rate: int) -> np.ndarray:
    """Sentences into one waveform, with a short pause between them."""
    pause = np.zeros(int(PAUSE_S * sample_rate), dtype=np.float32)
    return np.concatenate([x for w in wavs for x in (w, pause)][:-1])


def encode(wav: np.ndarray, sample_rate: int, fmt: str) -> bytes:
    """A whole response body in `fmt`; pcm and opus are resampled to the rate clients expect of them."""
    rate = output_rate(fmt, sample_rate)
    wav = _resample(wav, sample_rate, rate)
    if fmt == "pcm":
        return to_pcm16(wav)
    if fmt == "wav":
        pcm = to_pcm16(wav)
        return wav_header(rate, len(pcm)) + pcm
    return _sf_bytes(wav, rate, fmt)


def _sf_bytes(wav: np.ndarray, rate: int, fmt: str, constant_bitrate: bool = False) -> bytes:
    """libsndfile's encoding of `wav`; constant bitrate for mp3 pieces that are played back to back."""
    container, subtype = _SF_FORMATS[fmt]
    buf = io.BytesIO()
    # Constant: ~80 kbit/s at 22.05 kHz; a decoder sizes a stream that has no Info frame from it.
    options: dict[str, Any] = {"bitrate_mode": "CONSTANT", "compression_level": 0.5} if constant_bitrate else {}
    sf.write(buf, np.clip(wav, -1, 1), rate, format=container, subtype=subtype, **options)
    return buf.getvalue()


def _resample(wav: np.ndarray, orig: int, new: int) -> np.ndarray:
    """Band-limited (FFT) resampling, the project's own, so no resampling library is needed."""
    if orig == new or len(wav) == 0:
        return wav
    return resample(torch.from_numpy(np.ascontiguousarray(wav, dtype=np.float32)), orig, new).numpy()


class StreamEncoder:
    """Encodes speech sentence by sentence, so the first sentence can leave before the last is made.

    The pieces, concatenated, are one playable file: wav is a header of unknown length then PCM; pcm
    is 24 kHz PCM; mp3 is constant-bitrate MPEG frames with no Info frame. flac and opus containers
    cannot be cut like that (`incremental` is False): callers encode the whole waveform at the end.
    """

    INCREMENTAL: tuple[str, ...] = ("wav", "pcm", "mp3")

    def __init__(self, fmt: str, sample_rate: int) -> None:
        self.fmt, self.sample_rate, self.pieces = fmt, sample_rate, 0

    @property
    def incremental(self) -> bool:
        return self.fmt in self.INCREMENTAL

    def piece(self, wav: np.ndarray) -> bytes:
        """The next sentence's bytes, led by the same pause a whole file has between sentences."""
        if self.pieces:
            wav = np.concatenate([np.zeros(int(PAUSE_S * self.sample_rate), dtype=np.float32), wav])
        first, self.pieces = self.pieces == 0, self.pieces + 1
        if self.fmt == "mp3":
            return mp3_without_info_frame(_sf_bytes(wav, self.sample_rate, "mp3", constant_bitrate=True))
        if self.fmt == "pcm":
            return encode(wav, self.sample_rate, "pcm")
        pcm = to_pcm16(wav)  # wav: the stream's header (unknown length) leads the first piece
        return wav_header(self.sample_rate) + pcm if first else pcm


# MPEG audio layer III frame header tables (ISO 11172-3 / 13818-3), indexed by the header's fields.
_MP3_KBPS = {
    "mpeg1": (0, 32, 40, 48, 56, 64, 80, 96, 112, 128, 160, 192, 224, 256, 320),
    "mpeg2": (0, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 112, 128, 144, 160),
}
_MP3_RATES = {3: (44100, 48000, 32000), 2: (22050, 24000, 16000), 0: (11025, 12000, 8000)}  # by version id


def mp3_without_info_frame(data: bytes) -> bytes:
    """Drop the Xing/Info frame LAME puts first in an mp3 file.

    It states the frame count of this piece alone: a decoder given several pieces back to back stops
    after the first piece's count. Without it the frames simply play one after another.
    """
    length = _mp3_frame_length(data)
    if length is None or (b"Xing" not in data[:length] and b"Info" not in data[:length]):
        return data
    return data[length:]


def _mp3_frame_length(data: bytes) -> int | None:
    """Bytes in the layer III frame `data` starts with; None if it does not start with one."""
    if len(data) < 4 or data[0] != 0xFF or data[1] & 0xE0 != 0xE0 or (data[1] >> 1) & 3 != 1:
        return None
    version, kbps_i, rate_i, padding = (data[1] >> 3) & 3, data[2] >> 4, (data[2] >> 2) & 3, (data[2] >> 1) & 1
    if version == 1 or kbps_i in (0, 15) or rate_i == 3:
        return None
    kbps = _MP3_KBPS["mpeg1" if version == 3 else "mpeg2"][kbps_i]
    return (144 if version == 3 else 72) * kbps * 1000 // _MP3_RATES[version][rate_i] + padding
