"""The official `openai` SDK, unchanged, against `voxscale serve`: what an OpenAI user's code does works.

The server is a real `voxscale serve` process on a loopback port (as in test_inference.py) and every
request goes through the SDK's own client code; only the base URL differs from OpenAI's.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import openai
import pytest
import soundfile as sf

from tests.inference_helpers import ServerProcess
from voxscale.inference import audio
from voxscale.inference.openai_compat import (
    NO_INSTRUCTIONS,
    OPENAI_MODELS,
    OPENAI_VOICES,
    builtin_for_openai_voice,
    read_instructions,
)

DEFAULT_VOICE = "en_US-joe-medium"
MODEL_RATE = 22050  # the default voice's own sample rate
TWO_SENTENCES = "Hello there. Nice to meet you."


# ------------------------------------------------------------------------------------ pure translations
READINGS: list[tuple[str, str | None, float, str]] = [
    ("Speak in a calm, soothing voice.", "calm", 1.0, "style=calm (from: calm, soothing)"),
    ("Be cheerful and upbeat!", "cheerful", 1.0, "style=cheerful (from: cheerful, upbeat)"),
    ("Sound EXCITED and talk fast", "excited", 1.15, "style=excited, speed=x1.15 (from: excited, fast)"),
    ("Read it slowly and seriously.", "serious", 0.85, "style=serious, speed=x0.85 (from: slowly, seriously)"),
    ("Plain, neutral delivery", "neutral", 1.0, "style=neutral (from: plain, neutral)"),
    ("Quickly, please", None, 1.15, "speed=x1.15 (from: quickly)"),
    ("Not excited at all, just calm", "calm", 1.0, "style=calm (from: calm); ignored negated: excited"),
    ("Don\u2019t be fast, be gentle", "calm", 1.0, "style=calm (from: gentle); ignored negated: fast"),
    ("Cheerful but calm", "cheerful", 1.0, "style=cheerful (from: cheerful, calm)"),  # a tie: the first wins
    ("Calm, gentle, but a bit happy", "calm", 1.0, "style=calm (from: calm, gentle, happy)"),  # the most heard
    ("Slow at first, then fast", None, 1.0, "not understood, rendered neutral"),  # opposite speeds cancel
    ("Talk like a pirate", None, 1.0, "not understood, rendered neutral"),
    ("never excited", None, 1.0, "not understood; ignored negated: excited, rendered neutral"),
]


@pytest.mark.parametrize(("text", "style", "speed", "header"), READINGS, ids=[r[0] for r in READINGS])
def test_instructions_are_read_onto_style_and_speed(text: str, style: str | None, speed: float, header: str) -> None:
    reading = read_instructions(text)
    assert (reading.style, reading.speed) == (style, speed)
    assert reading.header() == header


def test_no_instructions_change_nothing_and_an_explicit_style_wins() -> None:
    assert read_instructions(None) == read_instructions("   ") == NO_INSTRUCTIONS
    assert read_instructions("whatever").header("serious") == "not understood, rendered serious"
    assert read_instructions("be calm").header("serious") == (
        "style=calm (from: calm); the request's style=serious wins over style=calm"
    )


def test_openai_voice_names_map_onto_the_pods_voices() -> None:
    assert {builtin_for_openai_voice(v, [DEFAULT_VOICE]) for v in OPENAI_VOICES} == {DEFAULT_VOICE}
    speakers = ["m:a", "m:b", "m:c"]
    spread = [builtin_for_openai_voice(v, speakers) for v in OPENAI_VOICES]
    assert set(spread) == set(speakers)  # a multi-speaker model uses all of its speakers
    assert spread == [builtin_for_openai_voice(v, speakers) for v in OPENAI_VOICES]  # stably
    assert builtin_for_openai_voice("default", speakers) == "m:a"
    assert builtin_for_openai_voice("zzz", speakers) is None


def _tone(seconds: float) -> np.ndarray:
    t = np.arange(int(seconds * MODEL_RATE)) / MODEL_RATE
    return (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_mp3_stream_pieces_play_back_to_back_as_one_file() -> None:
    encoder = audio.StreamEncoder("mp3", MODEL_RATE)
    pieces = [encoder.piece(_tone(s)) for s in (1.0, 0.5, 1.0)]
    decoded, sr = sf.read(io.BytesIO(b"".join(pieces)), dtype="float32")
    expected = (2.5 + 2 * audio.PAUSE_S) * MODEL_RATE
    assert sr == MODEL_RATE
    assert expected <= len(decoded) < expected + 0.3 * MODEL_RATE  # + the encoder's delay and padding per piece
    assert audio.mp3_without_info_frame(b"not an mp3") == b"not an mp3"


# ------------------------------------------------------------------------------------ through the SDK
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess.start(tmp_path_factory.mktemp("openai-sdk"))
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0, timeout=120) as c:
        yield c


def _is_mp3(data: bytes) -> bool:
    """An ID3 tag or an MPEG audio frame sync (11 set bits) at the start."""
    return data[:3] == b"ID3" or (len(data) > 1 and data[0] == 0xFF and data[1] & 0xE0 == 0xE0)


def _pcm_samples(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<i2")


def test_the_default_response_is_mp3(client: openai.OpenAI) -> None:
    raw = client.audio.speech.with_raw_response.create(model="tts-1", voice="alloy", input="Hello there.")
    body = raw.content
    assert raw.headers["content-type"] == "audio/mpeg"
    assert _is_mp3(body), body[:16]
    wav, sr = sf.read(io.BytesIO(body), dtype="float32")
    assert sr == MODEL_RATE and len(wav) > 0.4 * sr and np.abs(wav).max() > 0.05
    plain = client.audio.speech.create(model="tts-1", voice="alloy", input="Hello there.")  # the usual call
    assert _is_mp3(plain.content)


@pytest.mark.parametrize("voice", OPENAI_VOICES)
def test_every_openai_voice_name_is_rendered_and_says_with_what(client: openai.OpenAI, voice: str) -> None:
    raw = client.audio.speech.with_raw_response.create(
        model="gpt-4o-mini-tts", voice=voice, input="Hi.", response_format="pcm"
    )
    assert raw.headers["x-voxscale-voice-mapped"] == f"{voice} -> {DEFAULT_VOICE}"
    assert raw.headers["x-voxscale-voice"] == DEFAULT_VOICE
    assert len(raw.content) > 0.2 * audio.PCM_RATE * 2


@pytest.mark.parametrize("model", [*OPENAI_MODELS, "any-model-name"])
def test_every_model_name_is_accepted(client: openai.OpenAI, model: str) -> None:
    assert len(client.audio.speech.create(model=model, voice="nova", input="Hi.", response_format="pcm").content) > 0


def _pcm(client: openai.OpenAI, text: str, **kw: Any) -> tuple[bytes, dict[str, str]]:
    raw = client.audio.speech.with_raw_response.create(
        model="gpt-4o-mini-tts", voice="coral", input=text, response_format="pcm", extra_body={"seed": 7}, **kw
    )
    return raw.content, dict(raw.headers)


def test_instructions_are_applied_and_the_reading_is_in_a_header(client: openai.OpenAI) -> None:
    text = "Instructions change how this sounds."
    plain, plain_headers = _pcm(client, text)
    assert "x-voxscale-instructions" not in plain_headers
    calm, headers = _pcm(client, text, instructions="Speak calmly and slowly, like a bedtime story.")
    assert headers["x-voxscale-instructions"] == "style=calm, speed=x0.85 (from: calmly, slowly)"
    assert len(calm) > 1.1 * len(plain)  # calm stretches durations and slow lowers the speed (measured 1.2x)
    pirate, headers = _pcm(client, text, instructions="Talk like a pirate.")
    assert headers["x-voxscale-instructions"] == "not understood, rendered neutral"
    # Same seed, nothing applied: the same audio, up to float rounding between synthesis threads (a
    # fresh-clone make test once saw one sample differ by 1 LSB).
    same, other = np.frombuffer(plain, dtype="<i2"), np.frombuffer(pirate, dtype="<i2")
    assert same.shape == other.shape and int(np.abs(same.astype(np.int32) - other).max()) <= 2


def _sse_events(client: openai.OpenAI, text: str, fmt: str) -> tuple[list[dict[str, Any]], dict[str, str]]:
    with client.audio.speech.with_streaming_response.create(
        model="gpt-4o-mini-tts",
        voice="sage",
        input=text,
        response_format=fmt,
        stream_format="sse",
        extra_body={"seed": 7},
    ) as r:
        headers = dict(r.headers)
        lines = list(r.iter_lines())
    payloads = [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]
    assert len(payloads) == sum(1 for line in lines if line.strip()), lines  # only data lines, one event each
    return [json.loads(p) for p in payloads], headers


def _joined_deltas(events: list[dict[str, Any]]) -> bytes:
    assert [e["type"] for e in events[:-1]] == ["speech.audio.delta"] * (len(events) - 1)
    return b"".join(base64.b64decode(e["audio"]) for e in events[:-1])


def test_sse_streams_audio_deltas_then_done_with_usage(client: openai.OpenAI) -> None:
    events, headers = _sse_events(client, TWO_SENTENCES, "pcm")
    assert headers["content-type"].startswith("text/event-stream")
    assert len(events) == 3  # one delta per sentence, then done
    done = events[-1]
    assert done["type"] == "speech.audio.done"
    usage = done["usage"]
    assert usage["input_tokens"] > 0 and usage["output_tokens"] > 0
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    streamed = _joined_deltas(events)
    whole, _ = _pcm(client, TWO_SENTENCES)
    assert abs(len(streamed) - len(whole)) <= 8  # the same audio, resampled per sentence instead of at once


@pytest.mark.parametrize("fmt", ["mp3", "wav", "flac"])
def test_sse_deltas_join_into_a_playable_file(client: openai.OpenAI, fmt: str) -> None:
    events, _ = _sse_events(client, TWO_SENTENCES, fmt)
    assert events[-1]["type"] == "speech.audio.done"
    data = _joined_deltas(events)
    wav, sr = sf.read(io.BytesIO(data), dtype="float32")
    assert sr == MODEL_RATE and len(wav) > 1.0 * sr and np.abs(wav).max() > 0.05
    if fmt == "mp3":
        assert _is_mp3(data) and len(events) == 3  # sentence by sentence, like pcm


def test_raw_audio_stream_format_is_the_plain_file(client: openai.OpenAI) -> None:
    data = client.audio.speech.create(
        model="tts-1", voice="echo", input="Hi.", response_format="wav", stream_format="audio"
    ).content
    assert data[:4] == b"RIFF"


def test_aac_works_or_is_a_422_naming_the_field(client: openai.OpenAI) -> None:
    if "aac" in audio.supported_formats():
        data = client.audio.speech.create(model="tts-1", voice="ash", input="Hi.", response_format="aac").content
        assert len(data) > 0
        return
    with pytest.raises(openai.UnprocessableEntityError) as exc:
        client.audio.speech.create(model="tts-1", voice="ash", input="Hi.", response_format="aac")
    assert exc.value.param == "response_format"
    message = exc.value.body["message"]
    assert message.startswith("response_format: aac")
    assert all(fmt in message for fmt in audio.supported_formats())


def test_pcm_is_24_khz_s16le_and_says_so(client: openai.OpenAI) -> None:
    text = "Twenty four kilohertz."
    pcm, headers = _pcm(client, text)
    assert headers["content-type"] == "audio/pcm;rate=24000;encoding=s16le;channels=1"
    assert headers["x-sample-rate"] == "24000"
    wav_raw = client.audio.speech.with_raw_response.create(
        model="tts-1", voice="coral", input=text, response_format="wav", extra_body={"seed": 7}
    )
    wav, sr = sf.read(io.BytesIO(wav_raw.content), dtype="float32")
    assert sr == MODEL_RATE
    seconds = len(wav) / sr
    assert abs(len(pcm) - seconds * audio.PCM_RATE * 2) <= 4  # same audio, 24000 samples/s, 2 bytes each
    assert np.abs(_pcm_samples(pcm)).max() > 0.05 * 32767


BAD: list[tuple[str, dict[str, Any], type[openai.APIStatusError], str]] = [
    ("empty input", {"input": ""}, openai.UnprocessableEntityError, "input"),
    ("speed 10", {"speed": 10}, openai.UnprocessableEntityError, "speed"),
    ("unknown voice", {"voice": "zzz"}, openai.NotFoundError, "voice"),
    ("unknown voice object", {"voice": {"id": "vc_00000000deadbeef"}}, openai.NotFoundError, "voice"),
    ("unknown format", {"response_format": "ogg"}, openai.UnprocessableEntityError, "response_format"),
    ("unknown stream format", {"stream_format": "ws"}, openai.UnprocessableEntityError, "stream_format"),
    ("long instructions", {"instructions": "x" * 4097}, openai.UnprocessableEntityError, "instructions"),
    ("unknown field", {"extra_body": {"temperature": 0.5}}, openai.UnprocessableEntityError, "temperature"),
]


@pytest.mark.parametrize(("why", "args", "error", "field"), BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_a_4xx_naming_the_field(
    client: openai.OpenAI, why: str, args: dict[str, Any], error: type[openai.APIStatusError], field: str
) -> None:
    call: dict[str, Any] = {"model": "tts-1", "voice": "alloy", "input": "Hi.", **args}
    with pytest.raises(openai.APIStatusError) as exc:
        client.audio.speech.create(**call)
    assert isinstance(exc.value, error), f"{why}: {exc.value.status_code} {exc.value.body}"
    assert 400 <= exc.value.status_code < 500
    assert exc.value.param == field, exc.value.body
    assert exc.value.body["message"].startswith(f"{field}"), exc.value.body


def test_nothing_above_ended_in_a_server_error(server: ServerProcess) -> None:
    """Runs last: every refusal above was a deliberate 4xx, none an exception inside the server."""
    log = server.log.read_text()
    assert "Traceback" not in log and " 500 " not in log, log[-3000:]
