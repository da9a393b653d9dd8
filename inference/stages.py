"""Swapping one stage's weights for your own checkpoint, without touching the others.

The four stages are `nn.Module`s with fixed tensor contracts (see `vits.py` and `speaker.py`), so a
fine-tuned vocoder or speaker encoder is a state_dict file for that module. `VOXSCALE_STAGE_WEIGHTS`
(`vocoder=/models/hifigan.pt,speaker_encoder=/models/ge2e.pt`) names them; every key and shape must
fit the stage, or loading fails naming the stage, the file and the keys, never half-loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

STAGES = ("speaker_encoder", "text_encoder", "acoustic", "vocoder")
ENV = "VOXSCALE_STAGE_WEIGHTS"
# Buffers computed in code rather than learned: a checkpoint need not carry them.
DERIVED_BUFFERS = ("mel_fb", "window")
# Parameters only training uses (GE2E's similarity scale and bias): a checkpoint may carry them.
TRAINING_ONLY = ("similarity_weight", "similarity_bias")


class StageWeightsError(ValueError):
    """A stage checkpoint that cannot be used; the message names the stage, the file and the fix."""


def parse_stage_weights(spec: str | None) -> dict[str, Path]:
    """`stage=path,stage=path` -> {stage: path}; unknown stages and missing files are refused here."""
    out: dict[str, Path] = {}
    for part in (spec or "").split(","):
        part = part.strip()
        if not part:
            continue
        stage, sep, path = part.partition("=")
        stage = stage.strip()
        if not sep or not path.strip():
            raise StageWeightsError(f"{ENV}: {part!r} is not STAGE=PATH (stages: {', '.join(STAGES)})")
        if stage not in STAGES:
            raise StageWeightsError(f"{ENV}: unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        if stage in out:
            raise StageWeightsError(f"{ENV}: {stage} is given twice")
        file = Path(path.strip())
        if not file.is_file():
            raise StageWeightsError(f"{ENV}: {stage}={file}: no such file")
        out[stage] = file
    return out


def _state_dict(path: Path) -> Mapping[str, Any]:
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a file that is not a checkpoint
        raise StageWeightsError(f"{path}: not a torch checkpoint of tensors ({exc.__class__.__name__}: {exc})") from exc
    if isinstance(loaded, Mapping):
        for wrapper in ("state_dict", "model_state", "model"):  # common training-script layouts
            inner = loaded.get(wrapper)
            if isinstance(inner, Mapping):
                return inner
        return loaded
    raise StageWeightsError(f"{path}: holds a {type(loaded).__name__}, expected a state_dict (a dict of tensors)")


def load_stage_weights(stage: str, module: nn.Module, path: Path) -> None:
    """Load `path` into `module` all or nothing: every key present, none extra, every shape equal."""
    state = _state_dict(path)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state and k.rsplit(".", 1)[-1] not in DERIVED_BUFFERS]
    unexpected = [k for k in state if k not in expected and k not in TRAINING_ONLY]
    wrong = [
        f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and isinstance(v, torch.Tensor) and v.shape != expected[k].shape
    ]
    problems = [
        f"{what} {keys[:3]}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")
        for what, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
        if keys
    ]
    if problems:
        raise StageWeightsError(
            f"{path} does not fit the {stage} stage: {'; '.join(problems)}. "
            f"Save it with torch.save(module.state_dict(), path) from a module with this stage's architecture"
        )
    module.load_state_dict({k: v for k, v in state.items() if k in expected}, strict=False)
