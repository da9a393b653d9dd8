"""Registered voices that outlive a process and are shared by every replica.

A registered voice is its speaker embedding, which depends only on the speaker encoder; which built-in
voice renders it depends on the loaded model and is derived when it is used, never stored. With a
directory (a pod volume; a ReadWriteMany PersistentVolumeClaim when replicas > 1) each voice is one
small JSON file, written atomically, so a voice registered through one replica works through any other
and survives restarts. Without one, voices live in this process's memory only.

A voice belongs to the API key that registered it (its id, `owner`, in the record, so every replica and
the next process agree on it; see tenants.py for who may see what). Files written before keys existed
have no owner. Ids are content hashes per owner (`voice_id_for`): the same recording registered by two
keys gets two ids, so neither learns from an id or a cache hit that the other holds that recording.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger("voxscale.inference")

VOICE_ID = re.compile(r"vc_[0-9a-f]{16}")
FORMAT_VERSION = 1


class VoiceStoreError(RuntimeError):
    """The voice store's directory cannot be used; the message names it and the cause."""


@dataclass(frozen=True)
class StoredVoice:
    voice_id: str
    embedding: np.ndarray  # unit-norm float32 speaker embedding
    seconds: float  # length of the reference recording
    owner: str | None = None  # the registering API key's id; None: registered without keys (or before them)

    def to_json(self) -> str:
        """Version 1 still: `owner` is only added, and left out when None, so older replicas read the file."""
        record: dict[str, object] = {
            "version": FORMAT_VERSION,
            "id": self.voice_id,
            "seconds": round(self.seconds, 3),
            "embedding": [float(x) for x in self.embedding.astype(np.float32)],
        }
        if self.owner is not None:
            record["owner"] = self.owner
        return json.dumps(record)

    @classmethod
    def from_json(cls, text: str) -> StoredVoice:
        raw = json.loads(text)
        if raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"unknown format version {raw.get('version')!r}")
        owner = raw.get("owner")
        if owner is not None and not isinstance(owner, str):
            raise ValueError(f"owner: expected a key id, got {owner!r}")
        return cls(str(raw["id"]), np.asarray(raw["embedding"], dtype=np.float32), float(raw["seconds"]), owner)


def voice_id_for(wav: np.ndarray, sample_rate: int, owner: str | None) -> str:
    """The id of a recording registered by `owner`: its content hash, namespaced by the owner.

    Content-addressed so registering the same recording again costs nothing and gives the same id, on
    any replica; per owner so another key's registration of it is a different voice (see the module
    docstring). Without an owner it is the hash voices always had, so ids from before keys still match.
    """
    content = wav.astype(np.float32).tobytes() + str(sample_rate).encode()
    namespace = b"" if owner is None else owner.encode() + b"\0"
    return f"vc_{hashlib.sha256(namespace + content).hexdigest()[:16]}"


def write_atomically(path: Path, data: bytes) -> None:
    """Temp file beside `path`, fsync, rename: a reader on any replica sees the old file or the new, never half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def is_voice_id(name: str) -> bool:
    return VOICE_ID.fullmatch(name) is not None


class VoiceStore:
    """An in-memory LRU of embeddings in front of an optional directory of voice files."""

    def __init__(self, directory: Path | None = None, cache_size: int = 256) -> None:
        self.directory = directory
        self.cache_size = cache_size
        self._cache: OrderedDict[str, StoredVoice] = OrderedDict()
        self._lock = threading.Lock()
        if directory is not None:
            self._check_writable(directory)

    @staticmethod
    def _check_writable(directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".probe-"):
                pass
        except OSError as exc:
            raise VoiceStoreError(
                f"voice store {directory}: not a writable directory ({exc.strerror or exc}); "
                "mount a writable volume there or unset VOXSCALE_VOICE_STORE"
            ) from exc

    @property
    def persistent(self) -> bool:
        return self.directory is not None

    def _path(self, voice_id: str) -> Path:
        assert self.directory is not None and is_voice_id(voice_id)
        return self.directory / f"{voice_id}.json"

    def _remember(self, voice: StoredVoice) -> None:
        with self._lock:
            self._cache[voice.voice_id] = voice
            self._cache.move_to_end(voice.voice_id)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    def get(self, voice_id: str) -> StoredVoice | None:
        """The voice, from memory or the directory; None when unknown (or its file is unreadable).

        With a directory, a cached voice whose file is gone was deleted through another replica: it
        is forgotten here too (one stat per lookup, the price of deletion meaning deletion)."""
        if not is_voice_id(voice_id):
            return None
        path = self._path(voice_id) if self.directory is not None else None
        with self._lock:
            if voice_id in self._cache:
                if path is None or path.exists():
                    self._cache.move_to_end(voice_id)
                    return self._cache[voice_id]
                del self._cache[voice_id]
        if path is None:
            return None
        try:
            voice = StoredVoice.from_json(path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("voice store: unreadable %s (%s); registering the recording again rewrites it", path, exc)
            return None
        self._remember(voice)
        return voice

    def put(self, voice: StoredVoice) -> None:
        """Keep the voice; with a directory, durably (temp file, fsync, rename) before returning."""
        if not is_voice_id(voice.voice_id):
            raise ValueError(f"not a voice id: {voice.voice_id!r}")
        if self.directory is not None:
            path = self._path(voice.voice_id)
            try:
                write_atomically(path, voice.to_json().encode())
            except OSError as exc:
                raise VoiceStoreError(f"voice store {self.directory}: cannot write {path.name} ({exc})") from exc
        self._remember(voice)

    def delete(self, voice_id: str) -> bool:
        """Forget the voice here and, with a directory, on every replica; False when it was unknown.

        A voiceprint is biometric data: its owner must be able to have it removed. Other replicas drop
        their cached copy at their next lookup, when they find the file gone.
        """
        if not is_voice_id(voice_id):
            return False
        with self._lock:
            known = self._cache.pop(voice_id, None) is not None
        if self.directory is None:
            return known
        try:
            self._path(voice_id).unlink()
        except FileNotFoundError:
            return known
        except OSError as exc:
            raise VoiceStoreError(f"voice store {self.directory}: cannot delete {voice_id}.json ({exc})") from exc
        return True

    def ids(self) -> list[str]:
        """Every known voice id: this process's, or with a directory every replica's (the files are the truth)."""
        if self.directory is not None:
            return sorted(p.stem for p in self.directory.glob("vc_*.json") if is_voice_id(p.stem))
        with self._lock:
            return sorted(self._cache)
