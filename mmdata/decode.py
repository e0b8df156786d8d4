"""Decode one sample's members on a CPU worker: image, audio, text and labels, only for what was asked."""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import ConfigError, DecodeError
from .format import AUDIO_EXTS, IMAGE_EXTS, META_EXT, TEXT_EXT
from .tasks import Task


@dataclass
class Sample:
    """One decoded sample; None marks an absent (or not asked for) modality."""

    key: str
    image: torch.Tensor | None = None  # uint8 (3,H,W)
    image_jpeg: bytes | None = None  # undecoded JPEG, when the device decodes it
    audio: np.ndarray | None = None  # float32 (T,) mono, cropped to the configured length
    text_ids: list[int] | None = None
    labels: dict[str, Any] = field(default_factory=dict)  # task -> stored label or None


@dataclass(frozen=True)
class DecodeSpec:
    """What to decode and to which shape; resolved once by the loader from its config and the dataset."""

    modalities: tuple[str, ...]
    tasks: tuple[Task, ...]
    image_size: tuple[int, int] | None  # (H, W)
    audio_samples: int | None  # T
    sample_rate: int | None
    max_text_tokens: int
    image_on_device: bool = False
    audio_crop: str = "start"  # how a longer clip is cut: "random" (per epoch), "center" or "start"


class Decoder:
    """Turns {ext: bytes} into a Sample; holds the tokenizer (built lazily, in the worker)."""

    def __init__(self, spec: DecodeSpec, tokenizer_json: bytes | None):
        if "text" in spec.modalities and tokenizer_json is None:
            raise ConfigError("text was asked for but the dataset has no tokenizer/ folder; set "
                              "LoaderConfig(tokenizer=PATH) to a tokenizer.json, rebuild the dataset with a "
                              "tokenizer, or leave 'text' out of modalities")
        self.spec = spec
        self._tokenizer_json = tokenizer_json
        self._tok = None

    def __getstate__(self):
        return {**self.__dict__, "_tok": None}

    def __call__(self, key: str, members: dict[str, bytes], salt: str = "") -> Sample:
        """Decode one sample; ``salt`` (seed and epoch) makes a random audio crop differ per epoch."""
        s = Sample(key)
        spec = self.spec
        try:
            if "image" in spec.modalities:
                ext = next((e for e in IMAGE_EXTS if e in members), None)
                if ext == "jpg" and spec.image_on_device:
                    s.image_jpeg = members[ext]
                elif ext is not None:
                    s.image = decode_image(members[ext], spec.image_size)
            if "audio" in spec.modalities:
                ext = next((e for e in AUDIO_EXTS if e in members), None)
                if ext is not None:
                    s.audio = decode_audio(members[ext], spec.sample_rate, spec.audio_samples,
                                           crop=spec.audio_crop, salt=f"{salt}:{key}")
            if "text" in spec.modalities and TEXT_EXT in members:
                s.text_ids = self._encode_text(members[TEXT_EXT].decode("utf-8"))
            if spec.tasks:
                meta = json.loads(members[META_EXT]) if META_EXT in members else {}
                stored = meta.get("labels") or {}
                s.labels = {t.name: stored_label(t, stored.get(t.name)) for t in spec.tasks}
        except DecodeError:
            raise
        except Exception as e:  # any decoder failure becomes one error type naming the sample
            raise DecodeError(f"sample {key!r} cannot be decoded: {type(e).__name__}: {e}") from None
        return s

    def _encode_text(self, text: str) -> list[int]:
        from .tokenizer import encode, load_tokenizer

        if self._tok is None:
            self._tok = load_tokenizer(self._tokenizer_json)
        return encode(self._tok, text, self.spec.max_text_tokens)


def stored_label(task: Task, value: Any) -> Any:
    """``value`` when it is a stored label of ``task`` (or None); ValueError naming the task otherwise.

    The shard's json is not trusted: a class index out of range or a string would fail collate for the
    whole batch, where it must fail (or skip) only its sample.
    """
    if value is None:
        return None
    n = len(task.classes)
    if task.type == "classification":
        ok = type(value) is int and 0 <= value < n
    elif task.type == "multilabel":
        ok = isinstance(value, list) and all(type(v) is int and 0 <= v < n for v in value)
    else:
        values = value if isinstance(value, list) else [value]
        ok = len(values) == task.dims and all(type(v) in (int, float) and np.isfinite(v) for v in values)
    if not ok:
        want = f"{task.dims} finite numbers" if task.type == "regression" else f"class indices below {n}"
        raise ValueError(f"label {task.name!r} is {value!r}, not a stored {task.type} label ({want})")
    return value


def decode_image(data: bytes, size: tuple[int, int] | None) -> torch.Tensor:
    """Encoded image -> uint8 (3,H,W) RGB, resized (aspect kept, centre crop) to ``size`` when it differs."""
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    try:
        img = tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:  # formats torchvision cannot read: PIL
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            img = torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)
    if size is None or tuple(img.shape[-2:]) == tuple(size):
        return img.contiguous()
    return resize_crop(img, size)


def resize_crop(img: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (3,h,w) -> uint8 (3,H,W): scale so the image covers (H,W), then crop the centre."""
    from torchvision.transforms.v2 import functional as TF

    H, W = size
    h, w = img.shape[-2:]
    scale = max(H / h, W / w)
    nh, nw = max(H, round(h * scale)), max(W, round(w * scale))
    out = TF.resize(img, [nh, nw], antialias=True)
    top, left = (nh - H) // 2, (nw - W) // 2
    return out[:, top:top + H, left:left + W].contiguous()


def decode_audio(data: bytes, sample_rate: int | None, samples: int | None, crop: str = "start",
                 salt: str = "") -> np.ndarray:
    """FLAC/WAV bytes -> float32 (T,) mono at ``sample_rate``, cut to ``samples`` at most.

    ``crop``: "start", "center", or "random": an offset that is a pure function of ``salt`` (the
    loader passes seed, epoch and key), so a resumed epoch cuts every clip exactly as before.
    """
    import soundfile as sf

    wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True, frames=-1)
    wav = wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]  # (T,)
    if sample_rate and sr != sample_rate:
        import librosa

        wav = librosa.resample(wav, orig_sr=sr, target_sr=sample_rate).astype(np.float32)
    if samples is not None and len(wav) > samples:
        extra = len(wav) - samples
        if crop == "center":
            start = extra // 2
        elif crop == "random":
            digest = hashlib.blake2b(salt.encode(), digest_size=8).digest()
            start = int.from_bytes(digest, "little") % (extra + 1)
        else:
            start = 0
        wav = wav[start:start + samples]
    return np.ascontiguousarray(wav)
