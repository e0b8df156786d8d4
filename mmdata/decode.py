"""Decode one sample's members on a CPU worker: image, audio, text and labels, only for what was asked."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .audio import resample
from .errors import ConfigError, DecodeError
from .format import AUDIO_EXTS, IMAGE_EXTS, META_EXT, TEXT_EXT
from .geometry import resize_crop
from .tasks import Task


@dataclass
class Sample:
    """One decoded sample; None marks an absent (or not asked for) modality."""

    key: str
    image: torch.Tensor | None = None  # uint8 (3,H,W)
    image_jpeg: bytes | None = None  # undecoded JPEG, when the device decodes it
    image_jpeg_size: tuple[int, int] | None = None  # (h, w) of ``image_jpeg``, read from its header
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
                hw = device_jpeg_size(members[ext]) if ext is not None and spec.image_on_device else None
                if hw is not None:  # routed by content, not by name: the device decodes it
                    s.image_jpeg, s.image_jpeg_size = members[ext], hw
                elif ext is not None:
                    s.image = decode_image(members[ext], spec.image_size)
            if "audio" in spec.modalities:
                ext = next((e for e in AUDIO_EXTS if e in members), None)
                if ext is not None:
                    s.audio = decode_audio(members[ext], spec.sample_rate, spec.audio_samples,
                                           crop=spec.audio_crop, salt=f"{salt}:{key}")
            if "text" in spec.modalities and TEXT_EXT in members:
                s.text_ids = self._encode_text(decode_text(members[TEXT_EXT]))
            if spec.tasks:
                s.labels = decode_labels(spec.tasks, decode_meta(members.get(META_EXT)))
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


def decode_meta(data: bytes | None) -> dict[str, Any]:
    """``KEY.json`` bytes -> {"id": source id, "labels": {task: stored label or None}, ...}; {} when absent."""
    if data is None:
        return {}
    meta = json.loads(data)
    if not isinstance(meta, dict):
        raise ValueError(f"the .{META_EXT} member holds a {type(meta).__name__}, not an object with id and labels")
    if not isinstance(meta.get("labels") or {}, dict):
        raise ValueError(f"the .{META_EXT} member's labels are a {type(meta['labels']).__name__}, not an object "
                         "of task: label")
    return meta


def decode_labels(tasks: Iterable[Task], meta: dict[str, Any]) -> dict[str, Any]:
    """{task: stored label or None} of a sample's decoded ``KEY.json``; ValueError naming a bad label."""
    stored = meta.get("labels") or {}
    return {t.name: stored_label(t, stored.get(t.name)) for t in tasks}


def decode_text(data: bytes) -> str:
    """``KEY.txt`` bytes -> the text (UTF-8, as the build wrote it)."""
    return data.decode("utf-8")


def decode_rgb(data: bytes) -> torch.Tensor:
    """Encoded image -> uint8 (3,h,w) RGB on the CPU: torchvision (libjpeg, libpng, ...), else PIL.

    The one host decoder: the workers use it, and the device decode falls back to it per image.
    """
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as tv_decode

    try:
        return tv_decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except RuntimeError:  # formats torchvision cannot read: PIL
        from PIL import Image

        with Image.open(io.BytesIO(data)) as im:
            return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def decode_image(data: bytes, size: tuple[int, int] | None) -> torch.Tensor:
    """Encoded image -> uint8 (3,H,W) RGB, resized (aspect kept, centre crop) to ``size`` when it differs."""
    img = decode_rgb(data)
    if size is None or tuple(img.shape[-2:]) == tuple(size):
        return img.contiguous()
    return resize_crop(img, size)


JPEG_MAGIC = b"\xff\xd8\xff"
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # start-of-frame markers (not DHT, JPG, DAC)
_DEVICE_SOF = (0xC0, 0xC1, 0xC2)  # baseline, extended and progressive Huffman: what nvJPEG decodes


def jpeg_frame(data: bytes) -> tuple[int, int, int, int, int] | None:
    """(SOF marker, bits per sample, height, width, components) from a JPEG's header; None if not a JPEG.

    Reads the marker segments up to the first start-of-frame, not the image data.
    """
    if not data.startswith(JPEG_MAGIC):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:  # markers without a length
            i += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image or start of scan before any frame header
            return None
        length = int.from_bytes(data[i + 2:i + 4], "big")
        if marker in _SOF:
            if length < 8 or i + 10 > n:
                return None
            h, w = int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big")
            return marker, data[i + 4], h, w, data[i + 9]  # payload: P(1) Y(2) X(2) Nf(1)
        i += 2 + length
    return None


def device_jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(h, w) when ``data`` is a JPEG the device decoder reads, else None (decode it on the CPU).

    By content, not by file name: 8-bit Huffman JPEGs with 1 or 3 components. CMYK and YCCK (4
    components; nvJPEG in torchvision cannot convert them), 12-bit, lossless and arithmetic-coded
    JPEGs, a height left to a DNL marker, and anything that is not a JPEG go to the CPU decoder.
    """
    frame = jpeg_frame(data)
    if frame is None:
        return None
    marker, bits, h, w, comps = frame
    if marker not in _DEVICE_SOF or bits != 8 or comps not in (1, 3) or h == 0 or w == 0:
        return None
    return h, w


def read_audio(data: bytes) -> tuple[np.ndarray, int]:
    """FLAC/WAV bytes -> (float32 (T,) mono, the file's sample rate): channels averaged, nothing resampled."""
    import soundfile as sf

    wav, sr = sf.read(io.BytesIO(data), dtype="float32", always_2d=True, frames=-1)  # (T, C)
    return (wav.mean(axis=1) if wav.shape[1] > 1 else wav[:, 0]), sr


def decode_audio(data: bytes, sample_rate: int | None, samples: int | None, crop: str = "start",
                 salt: str = "") -> np.ndarray:
    """FLAC/WAV bytes -> float32 (T,) mono at ``sample_rate``, cut to ``samples`` at most.

    ``crop``: "start", "center", or "random": an offset that is a pure function of ``salt`` (the
    loader passes seed, epoch and key), so a resumed epoch cuts every clip exactly as before.
    """
    wav, sr = read_audio(data)
    if sample_rate and sr != sample_rate:
        wav = resample(wav[:, None], sr, sample_rate)[:, 0]
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
