"""Swapping one stage's weights: a checkpoint that fits is used, one that does not is refused by name."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from voxscale.inference.pipeline import TTSPipeline
from voxscale.inference.piper import PiperVoice, default_voice_paths, load_piper_voice
from voxscale.inference.speaker import load_speaker_encoder
from voxscale.inference.stages import StageWeightsError, load_stage_weights, parse_stage_weights

TEXT = "A fine tuned vocoder, please."
SILENT_SCALES = (0.0, 1.0, 0.0)  # no noise: the output depends on the weights alone


@pytest.fixture(scope="module")
def voice() -> PiperVoice:
    return load_piper_voice(default_voice_paths()[0])


def _speak(pipeline: TTSPipeline) -> np.ndarray:
    return pipeline.synthesize(pipeline.prepare(TEXT, SILENT_SCALES))[0]


def test_stage_weights_spec_is_parsed_and_checked(tmp_path: Path) -> None:
    ckpt = tmp_path / "v.pt"
    ckpt.write_bytes(b"")
    assert parse_stage_weights(f" vocoder={ckpt} , ") == {"vocoder": ckpt}
    assert parse_stage_weights(None) == {}
    for spec, message in [
        (f"vocoderr={ckpt}", "unknown stage 'vocoderr'; stages: speaker_encoder, text_encoder, acoustic, vocoder"),
        ("vocoder", "'vocoder' is not STAGE=PATH"),
        ("vocoder=", "is not STAGE=PATH"),
        (f"vocoder={tmp_path / 'missing.pt'}", "vocoder=" + str(tmp_path / "missing.pt") + ": no such file"),
        (f"vocoder={ckpt},vocoder={ckpt}", "vocoder is given twice"),
    ]:
        with pytest.raises(StageWeightsError, match="VOXSCALE_STAGE_WEIGHTS: ") as err:
            parse_stage_weights(spec)
        assert message in str(err.value)


def test_a_fine_tuned_vocoder_replaces_only_the_vocoder(tmp_path: Path, voice: PiperVoice) -> None:
    same, tuned = tmp_path / "same.pt", tmp_path / "tuned.pt"
    torch.save(voice.vocoder.state_dict(), same)
    state = {k: v.clone() for k, v in voice.vocoder.state_dict().items()}
    state["conv_post.weight"] *= 0.5  # a stand-in for fine-tuning: the output must follow it
    torch.save({"state_dict": state}, tuned)  # a training script's wrapper is unwrapped
    base = _speak(TTSPipeline.load(device="cpu"))
    assert np.array_equal(_speak(TTSPipeline.load(device="cpu", stage_weights={"vocoder": same})), base)
    changed = _speak(TTSPipeline.load(device="cpu", stage_weights={"vocoder": tuned}))
    assert len(changed) == len(base)  # durations come from the untouched acoustic stage
    assert not np.allclose(changed, base, atol=1e-3)


def test_weights_of_another_stage_are_refused_naming_the_stage_and_keys(tmp_path: Path, voice: PiperVoice) -> None:
    wrong = tmp_path / "text_encoder.pt"
    torch.save(voice.text_encoder.state_dict(), wrong)
    with pytest.raises(StageWeightsError) as err:
        load_stage_weights("vocoder", voice.vocoder, wrong)
    message = str(err.value)
    assert f"{wrong} does not fit the vocoder stage" in message
    assert "missing ['conv_pre.weight'" in message and "unexpected ['emb.weight'" in message


def test_a_reshaped_tensor_is_refused_and_nothing_is_half_loaded(tmp_path: Path, voice: PiperVoice) -> None:
    state = {k: v.clone() for k, v in voice.vocoder.state_dict().items()}
    state["conv_post.weight"] = torch.zeros(1, 2, 3)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    before = {k: v.clone() for k, v in voice.vocoder.state_dict().items()}
    with pytest.raises(StageWeightsError, match=r"wrong shape \['conv_post.weight \(1, 2, 3\) \(expected"):
        load_stage_weights("vocoder", voice.vocoder, bad)
    assert all(torch.equal(before[k], v) for k, v in voice.vocoder.state_dict().items())


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path: Path, voice: PiperVoice) -> None:
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(StageWeightsError, match="not a torch checkpoint of tensors"):
        load_stage_weights("vocoder", voice.vocoder, junk)


def test_own_speaker_encoder_checkpoint_gives_the_same_embedding_as_resemblyzers(tmp_path: Path) -> None:
    ours = tmp_path / "ge2e.pt"
    torch.save(load_speaker_encoder().state_dict(), ours)
    audio = torch.from_numpy(np.random.default_rng(1).standard_normal(16000 * 4).astype(np.float32) * 0.1)
    assert torch.equal(load_speaker_encoder(ours)(audio), load_speaker_encoder()(audio))
    torch.save({"lstm.weight_ih_l0": torch.zeros(3)}, tmp_path / "tiny.pt")
    with pytest.raises(StageWeightsError, match="does not fit the speaker_encoder stage"):
        load_speaker_encoder(tmp_path / "tiny.pt")


def test_serve_refuses_an_unknown_stage_before_loading_anything() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "voxscale.cli", "serve", "--stage-weights", "decoder=/models/x.pt"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "voxscale serve: VOXSCALE_STAGE_WEIGHTS: unknown stage 'decoder'" in out.stderr


class HalfGain(torch.nn.Module):
    """A user's own vocoder: any module honouring the contract z [B, C, T] -> waveform [B, 1, T * hop]."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, z: torch.Tensor, g: torch.Tensor | None = None) -> torch.Tensor:
        out: torch.Tensor = self.inner(z, g) * 0.5
        return out


def test_any_module_with_the_stage_contract_can_be_assigned(voice: PiperVoice) -> None:
    pipeline = TTSPipeline.load(device="cpu")
    base = _speak(pipeline)
    pipeline.voice.vocoder = HalfGain(pipeline.voice.vocoder)
    assert np.allclose(_speak(pipeline), base * 0.5, atol=1e-6)
