"""The voice store on its own: what a replica writes, any replica (or the next process) reads back."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from voxscale.inference.voices import StoredVoice, VoiceStore, VoiceStoreError

VOICE_ID = "vc_0123456789abcdef"


def voice(voice_id: str = VOICE_ID, seed: int = 0) -> StoredVoice:
    emb = np.random.default_rng(seed).standard_normal(256).astype(np.float32)
    return StoredVoice(voice_id, emb / np.linalg.norm(emb), 6.5)


@settings(max_examples=40, deadline=None)
@given(
    embedding=arrays(np.float32, 256, elements=st.floats(-1, 1, width=32)),
    seconds=st.floats(3, 30),
    voice_id=st.text("0123456789abcdef", min_size=16, max_size=16).map(lambda h: f"vc_{h}"),
)
def test_a_stored_voice_reads_back_exactly_in_a_new_process(
    tmp_path_factory: pytest.TempPathFactory, embedding: np.ndarray, seconds: float, voice_id: str
) -> None:
    directory = tmp_path_factory.mktemp("voices")
    VoiceStore(directory).put(StoredVoice(voice_id, embedding, seconds))
    back = VoiceStore(directory).get(voice_id)  # a fresh store: nothing in memory, only the file
    assert back is not None
    assert back.voice_id == voice_id and back.embedding.dtype == np.float32
    assert np.array_equal(back.embedding, embedding)
    assert back.seconds == pytest.approx(seconds, abs=1e-3)
    assert [p.name for p in directory.iterdir()] == [f"{voice_id}.json"]  # no temp files left behind


def test_replicas_sharing_a_directory_see_each_others_voices(tmp_path: Path) -> None:
    a, b = VoiceStore(tmp_path), VoiceStore(tmp_path)
    a.put(voice())
    assert b.ids() == [VOICE_ID]
    got = b.get(VOICE_ID)
    assert got is not None and np.array_equal(got.embedding, voice().embedding)


def test_without_a_directory_voices_live_in_memory_only() -> None:
    store = VoiceStore()
    store.put(voice())
    assert store.get(VOICE_ID) is not None and not store.persistent
    assert VoiceStore().get(VOICE_ID) is None


def test_the_memory_cache_is_bounded_but_the_directory_keeps_everything(tmp_path: Path) -> None:
    store = VoiceStore(tmp_path, cache_size=2)
    ids = [f"vc_{i:016x}" for i in range(5)]
    for i, voice_id in enumerate(ids):
        store.put(voice(voice_id, seed=i))
    assert len(store._cache) == 2
    assert store.ids() == sorted(ids)
    assert all(store.get(v) is not None for v in ids)


@pytest.mark.parametrize(
    "name",
    ["../../etc/passwd", "vc_short", "VC_0123456789ABCDEF", "alloy", "vc_0123456789abcdef/x", "vc_0123456789abcdef\n"],
)
def test_names_that_are_not_voice_ids_never_touch_the_filesystem(tmp_path: Path, name: str) -> None:
    store = VoiceStore(tmp_path)
    assert store.get(name) is None
    with pytest.raises(ValueError, match="not a voice id"):
        store.put(StoredVoice(name, voice().embedding, 5.0))


def test_an_unreadable_file_reads_as_unknown_and_registering_again_rewrites_it(tmp_path: Path) -> None:
    (tmp_path / f"{VOICE_ID}.json").write_text('{"version": 1, "id": "vc_0123')
    store = VoiceStore(tmp_path)
    assert store.get(VOICE_ID) is None
    store.put(voice())
    assert VoiceStore(tmp_path).get(VOICE_ID) is not None


def test_a_directory_that_cannot_be_written_fails_at_once_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(VoiceStoreError, match=f"voice store {blocker}/voices: not a writable directory"):
        VoiceStore(blocker / "voices")


# ------------------------------------------------------------------------------ owners (API keys)
def test_a_voices_owner_is_stored_and_read_back_by_any_replica(tmp_path: Path) -> None:
    owned = StoredVoice(VOICE_ID, voice().embedding, 6.5, owner="team-a")
    VoiceStore(tmp_path).put(owned)
    back = VoiceStore(tmp_path).get(VOICE_ID)  # another replica, or the next process
    assert back is not None and back.owner == "team-a"
    assert json.loads((tmp_path / f"{VOICE_ID}.json").read_text())["owner"] == "team-a"


def test_a_voice_file_from_before_owners_reads_as_nobodys_and_stays_that_way(tmp_path: Path) -> None:
    legacy = {"version": 1, "id": VOICE_ID, "seconds": 6.5, "embedding": [float(x) for x in voice().embedding]}
    (tmp_path / f"{VOICE_ID}.json").write_text(json.dumps(legacy))
    back = VoiceStore(tmp_path).get(VOICE_ID)
    assert back is not None and back.owner is None
    VoiceStore(tmp_path).put(back)  # rewritten without an owner: older replicas still read it as before
    assert set(json.loads((tmp_path / f"{VOICE_ID}.json").read_text())) == set(legacy)


def test_an_owner_that_is_not_a_key_id_makes_the_file_unreadable_not_anyones(tmp_path: Path) -> None:
    record = json.loads(StoredVoice(VOICE_ID, voice().embedding, 6.5, owner="team-a").to_json())
    (tmp_path / f"{VOICE_ID}.json").write_text(json.dumps({**record, "owner": ["team-a", "team-b"]}))
    assert VoiceStore(tmp_path).get(VOICE_ID) is None
