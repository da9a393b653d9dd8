"""Text front end: sentences, espeak-ng phonemes, and Piper phoneme ids.

espeak-ng (Debian's package) turns each clause into IPA; its clause punctuation is put back the way
Piper's phonemizer does, then every IPA symbol becomes an id through the voice's phoneme_id_map,
with a pad between symbols and BOS/EOS around the utterance.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import unicodedata
from dataclasses import dataclass

_SENTENCE = re.compile(r"(?<=[.!?…])\s+|\n{2,}")
_CLAUSE = re.compile(r"([^.,;:!?…]+)([.,;:!?…]*)")


class PhonemizerError(RuntimeError):
    pass


def split_sentences(text: str, max_chars: int = 400) -> list[str]:
    """Sentences for synthesis (and streaming); very long ones are cut at clause boundaries."""
    out: list[str] = []
    for sentence in _SENTENCE.split(text.strip()):
        sentence = " ".join(sentence.split())
        while len(sentence) > max_chars:
            cut = max(sentence.rfind(p, 0, max_chars) for p in (",", ";", ":", " "))
            cut = cut if cut > 0 else max_chars
            out.append(sentence[: cut + 1].strip())
            sentence = sentence[cut + 1 :].strip()
        if sentence:
            out.append(sentence)
    return out


@dataclass(frozen=True)
class Phonemizer:
    voice: str = "en-us"
    binary: str = "espeak-ng"

    def __post_init__(self) -> None:
        if shutil.which(self.binary) is None:
            raise PhonemizerError(f"{self.binary} is not installed (Debian package espeak-ng)")

    def phonemize(self, text: str) -> str:
        """IPA for one sentence, with its clause punctuation kept after each clause."""
        text = unicodedata.normalize("NFC", text)
        clauses = [(c.strip(), p) for c, p in _CLAUSE.findall(text) if c.strip()]
        if not clauses:
            return ""
        res = subprocess.run(
            [self.binary, "-q", "--ipa", "-v", self.voice],
            input="\n".join(c for c, _ in clauses),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if res.returncode != 0:
            raise PhonemizerError(f"espeak-ng failed: {res.stderr.strip()}")
        lines = [line.strip() for line in res.stdout.splitlines() if line.strip()]
        if len(lines) == len(clauses):
            return " ".join(f"{ipa}{punct[:1]}" for ipa, (_, punct) in zip(lines, clauses, strict=True))
        return ", ".join(lines) + (clauses[-1][1][:1] or "")


def phoneme_ids(ipa: str, id_map: dict[str, list[int]]) -> list[int]:
    """Piper's id layout: BOS, pad, then each known symbol followed by pad, then EOS."""
    pad, bos, eos = id_map["_"][0], id_map["^"][0], id_map["$"][0]
    ids = [bos, pad]
    for symbol in ipa:
        for i in id_map.get(symbol, []):
            ids += [i, pad]
    ids.append(eos)
    return ids
