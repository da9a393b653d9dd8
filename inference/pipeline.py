"""The four-stage pipeline put together: text -> phonemes -> (speaker) -> VITS -> waveform.

`TTSPipeline.synthesize()` takes a batch of already-phonemised requests and runs stages 2-4 on the
chosen device and precision in one padded batch; the server's batcher decides what goes together.
Repeated text is cheap: phonemes are cached per sentence, and audio per deterministic synthesis.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from voxscale import settings_contract as sc
from voxscale.inference.cache import LRUCache
from voxscale.inference.piper import PiperVoice, default_voice_paths, load_piper_voice
from voxscale.inference.speaker import SAMPLE_RATE as SPEAKER_SR
from voxscale.inference.speaker import SpeakerEncoder, load_speaker_encoder, resample
from voxscale.inference.stages import load_stage_weights
from voxscale.inference.text import Phonemizer, phoneme_ids, split_sentences
from voxscale.inference.vits import Scales
from voxscale.inference.voices import StoredVoice, VoiceStore

log = logging.getLogger("voxscale.inference")

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# Cache bounds: phonemes are tiny; audio is ~88 kB per second of speech at 22.05 kHz float32.
PHONEME_CACHE_ENTRIES, PHONEME_CACHE_BYTES = 8192, 4 << 20
AUDIO_CACHE_ENTRIES, AUDIO_CACHE_BYTES = 512, 128 << 20
# Prosody presets a TTS user expects, mapped onto VITS' sampling controls.
STYLES: dict[str, tuple[float, float, float]] = {  # name: (noise_scale x, noise_w x, length x)
    "neutral": (1.0, 1.0, 1.0),
    "calm": (0.7, 0.6, 1.12),
    "cheerful": (1.15, 1.2, 0.95),
    "excited": (1.3, 1.4, 0.88),
    "serious": (0.8, 0.7, 1.05),
}


@dataclass(frozen=True)
class Item:
    """One sentence to synthesise."""

    ids: list[int]
    scales: tuple[float, float, float]  # noise_scale, length_scale, noise_w
    seed: int | None = None
    speaker: int | None = None

    def deterministic(self, alone: bool) -> bool:
        """Whether synthesis gives the same audio every time: no noise at all, or a seed honoured
        (a seed is only honoured for an item synthesised alone; the batcher runs those alone)."""
        noise_scale, _, noise_w = self.scales
        return (noise_scale == 0 and noise_w == 0) or (self.seed is not None and alone)


AudioKey = tuple[object, ...]


def _phoneme_bytes(ipa: str) -> int:
    return len(ipa.encode()) + 64  # the key sentence is about as long; 64: per-entry overhead


def _audio_bytes(wav: np.ndarray) -> int:
    return int(wav.nbytes)


@dataclass(frozen=True)
class RegisteredVoice:
    """A stored voice as this model renders it."""

    voice_id: str
    embedding: np.ndarray
    mapped_to: str  # the built-in voice/speaker it is rendered with (the default model is not conditioned)
    similarity: float


def keep_large_allocations() -> None:
    """Ask glibc to keep big freed blocks instead of returning them to the kernel.

    The vocoder allocates and frees tens of MB per call; with glibc's defaults every call pays page
    faults for fresh mappings (~20 % of CPU synthesis time here). No-op where glibc is absent.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 2 << 30)


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bfloat16 itself (Ampere and later); emulation does not count."""
    with torch.cuda.device(device):
        return torch.cuda.is_bf16_supported(including_emulation=False)


def vocoder_dtype(precision: str, device: torch.device, bf16_native: Callable[[torch.device], bool]) -> torch.dtype:
    """The vocoder's dtype for VOXSCALE_PRECISION on `device`; bf16 on a GPU without it is refused.

    Half precision only where it helps: on the CPU everything runs fp32. A GPU without bfloat16
    (before Ampere: T4, V100) would emulate it, slower than fp32, so the start fails saying so."""
    if device.type != "cuda":
        return torch.float32
    if precision == "bf16" and not bf16_native(device):
        raise sc.SettingError(
            f"{sc.PRECISION.env}=bf16: this GPU ({device}) has no native bfloat16 (it needs compute capability "
            f"8.0, Ampere or later); set spec.model.precision / {sc.PRECISION.env} to fp16 or fp32"
        )
    return DTYPES[precision]


@dataclass
class TTSPipeline:
    voice: PiperVoice
    voice_name: str
    phonemizer: Phonemizer
    device: torch.device
    dtype: torch.dtype
    voices: VoiceStore = field(default_factory=VoiceStore)
    speaker_encoder_weights: Path | None = None  # None: Resemblyzer's pretrained GE2E
    _speaker_encoder: SpeakerEncoder | None = None
    _builtin_embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    phoneme_cache: LRUCache[str, str] = field(
        default_factory=lambda: LRUCache(PHONEME_CACHE_ENTRIES, PHONEME_CACHE_BYTES, _phoneme_bytes)
    )
    audio_cache: LRUCache[AudioKey, np.ndarray] = field(
        default_factory=lambda: LRUCache(AUDIO_CACHE_ENTRIES, AUDIO_CACHE_BYTES, _audio_bytes)
    )

    @classmethod
    def load(
        cls,
        voice: str = "en_US-joe-medium",
        precision: str = "fp32",
        device: str | None = None,
        voice_store: VoiceStore | None = None,
        stage_weights: Mapping[str, Path] | None = None,
    ) -> TTSPipeline:
        """Load a voice into stages 2-4, then any stage checkpoints given (see `stages.py`) over them."""
        keep_large_allocations()
        dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = vocoder_dtype(precision, dev, native_bf16)
        if voice in ("", "en_US-joe-medium", "default"):
            onnx_path, config_path = default_voice_paths()
            name = "en_US-joe-medium"
        else:
            onnx_path, config_path = Path(voice), None
            name = Path(voice).name.removesuffix(".onnx")
        model = load_piper_voice(onnx_path, config_path)
        stage_weights = dict(stage_weights or {})
        for stage in ("text_encoder", "acoustic", "vocoder"):
            if stage in stage_weights:
                load_stage_weights(stage, getattr(model, stage), stage_weights[stage])
                log.info("stage %s: weights from %s", stage, stage_weights[stage])
        model = model.to(dev)
        if dtype != torch.float32:
            model.vocoder.to(dtype)  # the vocoder dominates VITS time; the flows stay fp32 for stability
        pipeline = cls(
            model,
            name,
            Phonemizer(model.piper.espeak_voice),
            dev,
            dtype,
            voice_store or VoiceStore(),
            stage_weights.get("speaker_encoder"),
        )
        if pipeline.speaker_encoder_weights is not None:
            pipeline.speaker_encoder()  # a checkpoint that does not fit fails the start, not the first upload
        return pipeline

    @property
    def sample_rate(self) -> int:
        return self.voice.sample_rate

    def builtin_voices(self) -> list[str]:
        if self.voice.piper.speaker_id_map:
            return [f"{self.voice_name}:{s}" for s in self.voice.piper.speaker_id_map]
        return [self.voice_name]

    # ------------------------------------------------------------------ text
    def prepare(
        self, text: str, scales: tuple[float, float, float], seed: int | None = None, speaker: int | None = None
    ) -> list[Item]:
        items = []
        for ipa in self.phonemes(split_sentences(text)):
            ids = phoneme_ids(ipa, self.voice.piper.phoneme_id_map)
            if len(ids) > 3:
                items.append(Item(ids, scales, seed, speaker))
        return items

    def phonemised(self, text: str) -> bool:
        """Whether every sentence of `text` is in the phoneme cache, so `prepare` runs no espeak-ng
        (microseconds: the server then prepares on the event loop instead of hopping to a thread)."""
        return all(s in self.phoneme_cache for s in split_sentences(text))

    def phonemes(self, sentences: list[str]) -> list[str]:
        """IPA per sentence: cached ones from the LRU, all the others in one espeak-ng call."""
        found = {s: self.phoneme_cache.get(s) for s in dict.fromkeys(sentences)}
        missing = [s for s, ipa in found.items() if ipa is None]
        for sentence, ipa in zip(missing, self.phonemizer.phonemize_many(missing), strict=True):
            self.phoneme_cache.put(sentence, ipa)
            found[sentence] = ipa
        return [found[s] or "" for s in sentences]

    # ------------------------------------------------------------------ synthesis
    def synthesize(self, items: list[Item]) -> list[np.ndarray]:
        """Stages 2-4 for a padded batch; float32 waveforms in [-1, 1], one per item.

        Deterministic items (see `Item.deterministic`) are served from the audio cache when the
        same ids, scales, seed and speaker were synthesised before by the same stage modules."""
        alone = len(items) == 1
        keys = [self._audio_key(i) if i.deterministic(alone) else None for i in items]
        cached = [self.audio_cache.get(k) if k is not None else None for k in keys]
        todo = [row for row, wav in enumerate(cached) if wav is None]
        fresh = dict(zip(todo, self._synthesize_batch([items[row] for row in todo]), strict=True))
        for row, wav in fresh.items():
            key = keys[row]
            if key is not None:
                self.audio_cache.put(key, wav.copy())  # the caller owns what it gets back
        return [fresh[row] if wav is None else wav.copy() for row, wav in enumerate(cached)]

    def _audio_key(self, item: Item) -> AudioKey:
        """The item, and which modules in which precision render it: a stage swapped in (stages.py)
        or a vocoder cast to half precision must not be answered with another's audio."""
        v = self.voice
        params = next(iter(v.vocoder.parameters()), None)
        modules = (id(v.text_encoder), id(v.acoustic), id(v.vocoder), params.dtype if params is not None else None)
        return (modules, tuple(item.ids), item.scales, item.seed, item.speaker)

    def _synthesize_batch(self, items: list[Item]) -> list[np.ndarray]:
        """One padded batch through stages 2-4, each item's audio trimmed to its own length."""
        if not items:
            return []
        with torch.inference_mode():  # no lock: the modules keep no state, CPU workers run side by side
            n = max(len(i.ids) for i in items)
            ids = torch.zeros(len(items), n, dtype=torch.long)
            for row, item in enumerate(items):
                ids[row, : len(item.ids)] = torch.tensor(item.ids)
            lengths = torch.tensor([len(i.ids) for i in items])
            sc = torch.tensor([i.scales for i in items], dtype=torch.float32, device=self.device)
            scales = Scales(sc[:, 0], sc[:, 1], sc[:, 2])
            generator = None
            if len(items) == 1 and items[0].seed is not None:
                generator = torch.Generator(device=self.device).manual_seed(items[0].seed)
            speakers = None
            if self.voice.emb_g is not None:
                speakers = torch.tensor([i.speaker or 0 for i in items], device=self.device)
            wav, lengths_out = self.voice(ids.to(self.device), lengths.to(self.device), scales, speakers, generator)
            samples = lengths_out.tolist()
            out = wav[:, 0].cpu().numpy()
        return [out[row, : samples[row]].copy() for row in range(len(items))]

    def warm_up(self) -> None:
        """Run once through every stage so the first real request does not pay for lazy init."""
        self.synthesize(self.prepare("Warming up.", (0.667, 1.0, 0.8)))
        if self.voices.ids():  # stored voices from earlier runs or other replicas: be ready to map them
            self.builtin_embeddings()

    # ------------------------------------------------------------------ voices
    def speaker_encoder(self) -> SpeakerEncoder:
        if self._speaker_encoder is None:
            self._speaker_encoder = load_speaker_encoder(self.speaker_encoder_weights)
        return self._speaker_encoder

    def embed(self, wav: np.ndarray, sample_rate: int) -> np.ndarray:
        audio = resample(torch.from_numpy(wav.astype(np.float32)), sample_rate, SPEAKER_SR)
        return self.speaker_encoder()(audio).numpy()

    def builtin_embeddings(self) -> dict[str, np.ndarray]:
        """Embeddings of the loaded voices' own speech, computed once and cached."""
        if not self._builtin_embeddings:
            text = "The quick brown fox jumps over the lazy dog. A voice is worth a thousand words."
            for name in self.builtin_voices():
                sid = self.voice.piper.speaker_id_map.get(name.split(":", 1)[-1]) if ":" in name else None
                audio = np.concatenate(self.synthesize(self.prepare(text, (0.667, 1.0, 0.8), 7, sid)))
                self._builtin_embeddings[name] = self.embed(audio, self.sample_rate)
        return self._builtin_embeddings

    def _mapped(self, stored: StoredVoice) -> RegisteredVoice:
        """Render a stored embedding with the most similar built-in voice (this model is not conditioned)."""
        scores = {name: float(np.dot(stored.embedding, ref)) for name, ref in self.builtin_embeddings().items()}
        best = max(scores, key=lambda k: scores[k])
        return RegisteredVoice(stored.voice_id, stored.embedding, best, scores[best])

    def register(self, wav: np.ndarray, sample_rate: int) -> tuple[RegisteredVoice, bool]:
        """A voice id for a reference recording; the same content costs nothing twice, on any replica."""
        digest = hashlib.sha256(wav.astype(np.float32).tobytes() + str(sample_rate).encode()).hexdigest()
        voice_id = f"vc_{digest[:16]}"
        known = self.voices.get(voice_id)
        if known is not None:
            return self._mapped(known), True
        stored = StoredVoice(voice_id, self.embed(wav, sample_rate), len(wav) / sample_rate)
        self.voices.put(stored)
        return self._mapped(stored), False

    def registered_voice(self, voice_id: str) -> RegisteredVoice | None:
        stored = self.voices.get(voice_id)
        return self._mapped(stored) if stored is not None else None

    def registered_voices(self) -> list[RegisteredVoice]:
        found = (self.voices.get(voice_id) for voice_id in self.voices.ids())
        return [self._mapped(v) for v in found if v is not None]
