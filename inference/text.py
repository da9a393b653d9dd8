"""Text front end: sentences, espeak-ng phonemes, and Piper phoneme ids.

espeak-ng (Debian's package) turns each clause into IPA; its clause punctuation is put back the way
Piper's phonemizer does, then every IPA symbol becomes an id through the voice's phoneme_id_map,
with a pad between symbols and BOS/EOS around the utterance.
"""

from __future__ import annotations

import functools
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


# A line espeak-ng renders as one line of its own, put between the sentences of one call so its
# output can be cut back into sentences; spelled out letter by letter, never a clause of real text.
SENTINEL = "zqxjvk"


def _clauses(text: str) -> list[tuple[str, str]]:
    """(clause, its trailing punctuation) pairs of one sentence; espeak-ng gets one clause a line."""
    text = unicodedata.normalize("NFC", text)
    return [(c.strip(), p) for c, p in _CLAUSE.findall(text) if c.strip()]


def _assemble(lines: list[str], clauses: list[tuple[str, str]]) -> str:
    """One sentence's IPA from espeak-ng's lines for its clauses, the punctuation put back as Piper does."""
    if len(lines) == len(clauses):
        return " ".join(f"{ipa}{punct[:1]}" for ipa, (_, punct) in zip(lines, clauses, strict=True))
    return ", ".join(lines) + (clauses[-1][1][:1] or "")


@dataclass(frozen=True)
class Phonemizer:
    voice: str = "en-us"
    binary: str = "espeak-ng"

    def __post_init__(self) -> None:
        if shutil.which(self.binary) is None:
            raise PhonemizerError(f"{self.binary} is not installed (Debian package espeak-ng)")

    def _espeak(self, lines: list[str]) -> list[str]:
        """espeak-ng's IPA output lines for input lines, blank ones dropped (one process per call)."""
        res = subprocess.run(
            [self.binary, "-q", "--ipa", "-v", self.voice],
            input="\n".join(lines),
            capture_output=True,
            text=True,
            timeout=30,
        )
        if res.returncode != 0:
            raise PhonemizerError(f"espeak-ng failed: {res.stderr.strip()}")
        return [line.strip() for line in res.stdout.splitlines() if line.strip()]

    @functools.cached_property
    def _sentinel(self) -> str:
        """The sentinel line as this voice renders it ("" if it renders as anything but one line)."""
        out = self._espeak([SENTINEL])
        return out[0] if len(out) == 1 else ""

    def phonemize(self, text: str) -> str:
        """IPA for one sentence, with its clause punctuation kept after each clause."""
        clauses = _clauses(text)
        return _assemble(self._espeak([c for c, _ in clauses]), clauses) if clauses else ""

    def phonemize_many(self, sentences: list[str]) -> list[str]:
        """`phonemize` of each sentence, in one espeak-ng process instead of one per sentence.

        Starting espeak-ng (loading its voice data) costs more than phonemising a sentence, so a
        request's sentences go in one call, a sentinel line between them. If espeak-ng's output does
        not cut back into as many sentences (a voice that renders the sentinel oddly), each sentence
        is phonemised on its own: the result is always what `phonemize` gives."""
        clauses = [_clauses(s) for s in sentences]
        spoken = [c for c in clauses if c]
        if len(spoken) < 2 or not self._sentinel:
            return [_assemble(self._espeak([c for c, _ in cl]), cl) if cl else "" for cl in clauses]
        lines: list[str] = []
        for cl in spoken:
            lines += [c for c, _ in cl] + [SENTINEL]
        groups = _split_at(self._espeak(lines), self._sentinel)
        if len(groups) != len(spoken) + 1 or groups[-1]:
            return [self.phonemize(s) for s in sentences]
        found = iter(groups)
        return [_assemble(next(found), cl) if cl else "" for cl in clauses]


def _split_at(lines: list[str], sentinel: str) -> list[list[str]]:
    """Lines cut at each sentinel line (n sentinels: n + 1 groups, the last empty if it ended one)."""
    groups: list[list[str]] = [[]]
    for line in lines:
        if line == sentinel:
            groups.append([])
        else:
            groups[-1].append(line)
    return groups


def phoneme_ids(ipa: str, id_map: dict[str, list[int]]) -> list[int]:
    """Piper's id layout: BOS, pad, then each known symbol followed by pad, then EOS."""
    pad, bos, eos = id_map["_"][0], id_map["^"][0], id_map["$"][0]
    ids = [bos, pad]
    for symbol in ipa:
        for i in id_map.get(symbol, []):
            ids += [i, pad]
    ids.append(eos)
    return ids
