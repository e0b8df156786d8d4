"""Pretrained backbones from local files only: state dicts, Hugging Face folders, freezing.

Nothing is downloaded and nothing is unpickled: a state dict is read from safetensors, or from a
``.pth`` with ``torch.load(weights_only=True)``; a Hugging Face folder is read with
``local_files_only=True``. Every failure is a ConfigError naming the config key, the path, and for
weights that do not fit, the first key that does not.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from mmdata.errors import ConfigError

log = logging.getLogger(__name__)

STATE_DICT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
# where a Hugging Face model keeps its stack of blocks, tried in order (BERT, wav2vec2/HuBERT, Whisper encoder)
HF_BLOCKS = ("encoder.layer", "encoder.layers", "layers", "transformer.layer", "layer")


def existing(path: str | None, key: str, want: str) -> Path:
    """``path`` as a Path when it exists, else a ConfigError naming ``key`` and what it should be."""
    if not path:
        raise ConfigError(f"{key} must be set to {want}")
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError(f"{key}: {str(p)!r} does not exist; give {want}")
    return p


def read_state_dict(path: str, key: str) -> dict[str, torch.Tensor]:
    """Tensors of a state dict file: safetensors, or a ``.pth`` read with ``weights_only=True``."""
    p = existing(path, key, "a .safetensors or .pth state dict")
    if p.suffix not in STATE_DICT_SUFFIXES:
        raise ConfigError(f"{key}: {str(p)!r} is not a state dict file; give one of {list(STATE_DICT_SUFFIXES)}")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(p))
        except Exception as e:  # noqa: BLE001 - a truncated or foreign file: say which and why
            raise ConfigError(f"{key}: {str(p)!r} is not a readable safetensors file: {e}") from None
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)  # never unpickles code
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"{key}: {str(p)!r} is not a plain state dict of tensors (read with "
                          f"weights_only=True): {str(e).splitlines()[0]}") from None
    for wrapper in ("state_dict", "model"):  # a training checkpoint that holds the weights under a key
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"{key}: {str(p)!r} holds no state dict ({{name: tensor}})")
    return state


def load_fitting(module: nn.Module, state: dict[str, torch.Tensor], key: str, path: str,
                 skip: tuple[str, ...] = ()) -> None:
    """Load ``state`` into ``module`` exactly, or raise naming the first key that does not fit.

    Keys starting with a ``skip`` prefix (a classifier the encoder replaces) are left out of both sides.
    """
    state = {k: v for k, v in state.items() if not k.startswith(skip)}
    own = {k: v for k, v in module.state_dict().items() if not k.startswith(skip)}
    problem = None
    for name, value in own.items():  # in the module's order: the first layer that does not fit
        if name not in state:
            problem = f"{name!r} is missing from the file"
        elif tuple(state[name].shape) != tuple(value.shape):
            problem = f"{name!r} has shape {tuple(state[name].shape)} in the file, {tuple(value.shape)} in the model"
        if problem:
            break
    extra = [k for k in state if k not in own]
    if problem is None and extra:
        problem = f"{extra[0]!r} in the file is not in the model"
    if problem:
        raise ConfigError(f"{key}: the weights in {path!r} do not fit the architecture: {problem}"
                          f"{_prefix_hint(list(state), list(own))}")
    module.load_state_dict(state, strict=False)  # strict over every key but the skipped ones, checked above


def _prefix_hint(theirs: list[str], ours: list[str]) -> str:
    """A hint when the file's keys are the model's under one extra prefix (``module.`` from DDP)."""
    if not theirs or not ours:
        return ""
    first = theirs[0].split(".")[0] + "."
    if all(k.startswith(first) for k in theirs) and ours[0] in {k[len(first):] for k in theirs}:
        return f"; its keys carry an extra prefix {first!r}: save the model's own state_dict()"
    return ""


def freeze(backbone: nn.Module, blocks: list[nn.Module], setting: bool | int, key: str) -> None:
    """Freeze ``backbone``: everything (True), nothing (False), or all but its last N ``blocks`` (N)."""
    if setting is False:
        return
    for p in backbone.parameters():
        p.requires_grad_(False)
    if setting is True:
        return
    if setting > len(blocks):
        raise ConfigError(f"{key}: {setting} blocks to train, but the backbone has {len(blocks)}; use at most "
                          f"{len(blocks)} (or false to train everything)")
    for block in blocks[len(blocks) - setting:]:
        for p in block.parameters():
            p.requires_grad_(True)


def keep_frozen_in_eval(backbone: nn.Module) -> None:
    """Put every wholly frozen part of ``backbone`` in eval mode: no BatchNorm statistics, no dropout."""
    for m in backbone.modules():
        params = list(m.parameters())
        if params and not any(p.requires_grad for p in params):
            m.eval()


def hf_blocks(model: nn.Module) -> list[nn.Module]:
    """The stack of transformer blocks of a Hugging Face model (its first ModuleList among HF_BLOCKS)."""
    for name in HF_BLOCKS:
        try:
            found = model.get_submodule(name)
        except AttributeError:
            continue
        if isinstance(found, nn.ModuleList):
            return list(found)
    return []


def hf_model(path: str | None, key: str) -> nn.Module:
    """A Hugging Face model from a local folder (its encoder, for an encoder-decoder such as Whisper)."""
    from transformers import AutoModel

    folder = existing(path, key, "a local folder saved with save_pretrained")
    try:  # mismatched shapes are reported below, by name, rather than raised without one
        model, info = AutoModel.from_pretrained(str(folder), local_files_only=True, output_loading_info=True,
                                                ignore_mismatched_sizes=True)
    except Exception as e:  # noqa: BLE001 - no config.json, no weights, a foreign file
        raise ConfigError(f"{key}: cannot load a model from {str(folder)!r}: {_first_line(e)}") from None
    problems = {k if isinstance(k, str) else k[0]: "has another shape in the file than in its config.json"
                for k in info.get("mismatched_keys", ())}
    problems.update({k: "is missing from the file" for k in info.get("missing_keys", ()) if not k.startswith("pooler.")})
    first = next((k for k in model.state_dict() if k in problems), next(iter(sorted(problems)), None))
    if first is not None:
        raise ConfigError(f"{key}: the weights in {str(folder)!r} do not fit the architecture: {first!r} "
                          f"{problems[first]}")
    if getattr(model.config, "is_encoder_decoder", False):
        model = model.get_encoder()  # Whisper: the audio encoder alone
    if getattr(model, "pooler", None) is not None:
        model.pooler = None  # BERT's pooler: unused (features are pooled over tokens) and never trained
    return model


def _first_line(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0]
