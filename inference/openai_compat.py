"""What OpenAI's speech API asks for that this model has no direct knob for, translated onto ours.

Kept free of the web framework and the model, so each translation is a pure function that can be
tested on plain values: voice names, free-text `instructions`, and the Server-Sent Events framing.
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

# OpenAI's built-in voice names (speech API reference, 2025). One tuple: the request model, the voice
# resolution and the tests all read it, so a new name is added here once.
OPENAI_VOICES: tuple[str, ...] = (
    "alloy",
    "ash",
    "ballad",
    "coral",
    "echo",
    "fable",
    "onyx",
    "nova",
    "sage",
    "shimmer",
    "verse",
    "marin",
    "cedar",
)
# Model names clients send; any string is accepted (the pod's voice model renders), these are documented.
OPENAI_MODELS: tuple[str, ...] = ("tts-1", "tts-1-hd", "gpt-4o-mini-tts", "gpt-4o-mini-tts-2025-12-15")


def builtin_for_openai_voice(name: str, builtins: Sequence[str]) -> str | None:
    """The pod voice an OpenAI voice name renders with; None if `name` is not one of OpenAI's.

    A multi-speaker model spreads the names over its speakers (stable: same name, same speaker);
    a single-voice model renders every name with its one voice. "default" is the first voice.
    """
    if name == "default":
        return builtins[0]
    if name not in OPENAI_VOICES:
        return None
    return builtins[OPENAI_VOICES.index(name) % len(builtins)]


# ---------------------------------------------------------------------------------------- instructions
# Words that pick one of the server's prosody presets (pipeline.STYLES). Chosen for what each preset
# does to VITS' sampling: calm is slower and steadier, excited faster and more varied, and so on.
STYLE_WORDS: dict[str, tuple[str, ...]] = {
    "calm": (
        "calm", "calmly", "soothing", "gentle", "gently", "soft", "softly", "relaxed", "relaxing", "peaceful",
        "quiet", "quietly", "tranquil", "serene", "meditative", "whisper", "whispering", "reassuring",
    ),
    "cheerful": (
        "cheerful", "cheerfully", "happy", "happily", "friendly", "warm", "warmly", "upbeat", "joyful",
        "bright", "positive", "pleasant", "playful", "smiling", "sunny", "delighted",
    ),
    "excited": (
        "excited", "excitedly", "exciting", "enthusiastic", "enthusiastically", "energetic", "thrilled",
        "lively", "animated", "dramatic", "hyped", "exuberant", "passionate", "intense",
    ),
    "serious": (
        "serious", "seriously", "formal", "formally", "professional", "professionally", "authoritative",
        "stern", "grave", "somber", "sombre", "solemn", "newscaster", "businesslike", "firm",
    ),
    "neutral": ("neutral", "plain", "flat", "monotone", "monotonous", "unemotional", "natural"),
}  # fmt: skip
SPEED_WORDS: dict[str, float] = {
    **dict.fromkeys(("slow", "slowly", "slower", "unhurried", "leisurely", "deliberately"), 0.85),
    **dict.fromkeys(("fast", "faster", "quick", "quickly", "rapid", "rapidly", "brisk", "briskly", "hurried"), 1.15),
}
NEGATIONS = frozenset({"not", "no", "never", "don't", "dont", "without", "avoid", "isn't", "less"})
_NEGATION_WINDOW = 3  # a negation this many words before a keyword cancels it ("not too fast")
_WORD = re.compile(r"[a-z]+(?:'[a-z]+)?")
_STYLE_OF = {word: style for style, words in STYLE_WORDS.items() for word in words}


@dataclass(frozen=True)
class InstructionReading:
    """How free-text `instructions` were understood, in terms of this server's controls."""

    style: str | None  # a pipeline.STYLES key, or None when no style word was understood
    speed: float  # a factor on the request's speed; 1.0 when no speed word was understood
    heard: tuple[str, ...]  # the keywords that decided it, in order of appearance
    negated: tuple[str, ...]  # keywords that appeared negated ("not excited") and were ignored

    def header(self, explicit_style: str | None = None) -> str:
        """The X-Voxscale-Instructions value: what was applied and why, so nothing is silently dropped."""
        ignored = f"; ignored negated: {', '.join(self.negated)}" if self.negated else ""
        if self.style is None and self.speed == 1.0:
            rendered = explicit_style or "neutral"
            return f"not understood{ignored}, rendered {rendered}"
        parts = []
        if self.style is not None:
            parts.append(f"style={self.style}")
        if self.speed != 1.0:
            parts.append(f"speed=x{self.speed:g}")
        text = f"{', '.join(parts)} (from: {', '.join(self.heard)}){ignored}"
        if explicit_style is not None and self.style not in (None, explicit_style):
            text += f"; the request's style={explicit_style} wins over style={self.style}"
        return text


NO_INSTRUCTIONS = InstructionReading(None, 1.0, (), ())


def read_instructions(text: str | None) -> InstructionReading:
    """Map the words of `instructions` onto a style preset and a speed factor.

    OpenAI's instructions steer a model that understands language; this one has a handful of prosody
    controls, so a few words are recognised and the rest is reported as not understood (never dropped
    silently: the caller puts `header()` in the response). The style heard most often wins; a tie
    goes to the one mentioned first. Opposite speed words cancel out.
    """
    if not text or not text.strip():
        return NO_INSTRUCTIONS
    words = _WORD.findall(text.lower().replace("\u2019", "'"))
    heard: list[str] = []
    negated: list[str] = []
    for i, word in enumerate(words):
        if word not in _STYLE_OF and word not in SPEED_WORDS:
            continue
        before = words[max(0, i - _NEGATION_WINDOW) : i]
        (negated if NEGATIONS.intersection(before) else heard).append(word)
    return InstructionReading(_pick_style(heard), _speed_factor(heard), tuple(heard), tuple(negated))


def _pick_style(heard: Sequence[str]) -> str | None:
    styles = [_STYLE_OF[w] for w in heard if w in _STYLE_OF]
    if not styles:
        return None
    return max(dict.fromkeys(styles), key=styles.count)  # dict keeps first-seen order: ties go to the first


def _speed_factor(heard: Sequence[str]) -> float:
    votes = sum(1 if SPEED_WORDS[w] > 1 else -1 for w in heard if w in SPEED_WORDS)
    if votes == 0:
        return 1.0
    return next(SPEED_WORDS[w] for w in heard if w in SPEED_WORDS and (SPEED_WORDS[w] > 1) == (votes > 0))


# ---------------------------------------------------------------------------------------- Server-Sent Events
def sse_event(payload: dict[str, Any]) -> bytes:
    """One Server-Sent Event carrying a JSON object (a `data:` line and the blank line that ends it)."""
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def audio_delta(chunk: bytes) -> bytes:
    """A `speech.audio.delta` event: the next bytes of the audio file, base64-encoded."""
    return sse_event({"type": "speech.audio.delta", "audio": base64.b64encode(chunk).decode("ascii")})


def audio_done(input_tokens: int, output_tokens: int) -> bytes:
    """The closing `speech.audio.done` event with OpenAI's usage fields.

    Here input tokens are the phoneme ids the model read and output tokens the vocoder frames it made:
    the units this model actually works in.
    """
    usage = {"input_tokens": input_tokens, "output_tokens": output_tokens, "total_tokens": input_tokens + output_tokens}
    return sse_event({"type": "speech.audio.done", "usage": usage})


def stream_error(message: str, code: str) -> bytes:
    """An `error` event: a failure after the 200 status was sent can only be reported in the stream."""
    return sse_event({"type": "error", "error": {"message": message, "code": code}})
