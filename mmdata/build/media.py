"""Media: read, check and encode one record's image, audio and text into tar members (runs in pool workers)."""

from __future__ import annotations

import io
import struct
import unicodedata
import zlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..audio import resample
from .guard import Refused, read_file, read_member
from .records import MediaRef

KEEP_IMAGE = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
PIL_SAVE = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}


@dataclass(frozen=True)
class MediaSettings:
    """The encoding choices of a build, resolved (sample_rate is a number here)."""

    image_format: str = "keep"
    image_quality: int = 90
    max_side: int | None = None
    max_pixels: int = 64_000_000
    sample_rate: int | None = 16000  # None: each file's own rate (the build settles on one after its pass)
    channels: int = 1
    audio_format: str = "flac"
    max_audio_seconds: float = 600.0


@dataclass
class Encoded:
    """One record's media in their stored form (tar members by extension) and the facts the index keeps."""

    members: dict[str, bytes]  # ext -> bytes
    image_width: int | None = None
    image_height: int | None = None
    audio_seconds: float | None = None
    audio_rate: int | None = None  # the stored rate
    text_chars: int | None = None


class MediaReject(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def encode_media(media: dict[str, MediaRef], settings: MediaSettings) -> Encoded:
    """Read and encode a checked record's media; raises MediaReject with the reject's reason."""
    out = Encoded({})
    for modality in ("image", "audio", "text"):
        ref = media.get(modality)
        if ref is None:
            continue
        data = ref.data if ref.data is not None else _read(ref)
        if not data:
            raise MediaReject("empty_file", f"{modality} {ref.path!r} is empty (0 bytes)")
        if modality == "image":
            ext, blob, (out.image_width, out.image_height) = encode_image(data, settings)
        elif modality == "audio":
            ext, blob, out.audio_seconds, out.audio_rate = encode_audio(data, ref.ext, settings)
        else:
            ext, blob, text = encode_text(data)
            out.text_chars = len(text)
        out.members[ext] = blob
    return out


def _read(ref: MediaRef) -> bytes:
    """A checked file's bytes (never past the size its check saw), or a member's from its container."""
    try:
        if ref.container is not None:
            return read_member(ref.container, ref.offset or 0, ref.size or 0)
        return read_file(ref.real or ref.path or "", size=ref.size, max_bytes=ref.size)
    except Refused as e:
        raise MediaReject(e.reason, e.message) from None
    except OSError as e:
        raise MediaReject("unreadable", f"cannot read {ref.path!r}: {e.strerror or e}") from None


# ---- image ---------------------------------------------------------------------------------------------------


def encode_image(data: bytes, s: MediaSettings) -> tuple[str, bytes, tuple[int, int]]:
    """Return (ext, bytes, (width, height)); keep jpg/png/webp bytes when nothing needs changing."""
    from PIL import Image

    if s.image_format in ("keep", "png"):
        size = plain_png_size(data, s.max_pixels)
        if size and (s.max_side is None or max(size) <= s.max_side):
            return "png", data, size
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > s.max_pixels:
                raise MediaReject("too_large", f"image is {w}x{h} = {w * h} pixels > max_pixels {s.max_pixels}; "
                                  "raise max_pixels to keep it")
            fmt = im.format
            im.load()  # decode fully: catches truncated and corrupt files
            too_big = s.max_side is not None and max(w, h) > s.max_side
            stored = KEEP_IMAGE.get(fmt or "")
            if stored and not too_big and s.image_format in ("keep", stored):
                return stored, data, (w, h)
            target = "png" if s.image_format == "keep" else s.image_format
            if too_big:
                scale = s.max_side / max(w, h)
                im = im.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.Resampling.LANCZOS)
            return target, _save(im, target, s.image_quality), im.size
    except MediaReject:
        raise
    except Image.DecompressionBombError as e:
        raise MediaReject("too_large", f"image exceeds the decompression-bomb limit ({e})") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types for bad data
        raise MediaReject("unreadable", f"not a readable image ({type(e).__name__}: {e})") from None


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# (colour type, bit depths) -> channels, for the PNGs the fast path checks itself (no palette: Pillow does those)
PNG_KINDS = {0: ((1, 2, 4, 8, 16), 1), 2: ((8, 16), 3), 4: ((8, 16), 2), 6: ((8, 16), 4)}
# Chunks the fast path accepts, with their exact length (None: any). Anything else goes to Pillow.
PNG_PLAIN_CHUNKS = {b"IHDR": 13, b"IDAT": None, b"IEND": 0, b"gAMA": 4, b"sRGB": 1, b"pHYs": 9, b"cHRM": 32,
                    b"tIME": 7}
INFLATE_STEP = 1 << 20  # pixels are inflated this many bytes at a time, checked and dropped


def plain_png_size(data: bytes, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) of a complete, intact, non-interlaced, non-palette PNG, else None (ask Pillow).

    Checks what decoding would: IHDR first, the IDAT chunks in one run, every chunk's CRC and length,
    and that the image data inflates to exactly one filter byte (0-4) plus the pixel bytes per row,
    in bounded steps (memory stays small whatever the file claims). An image over ``max_pixels``
    is not inflated at all. Anything unusual returns None, so Pillow, slower but complete, has the
    last word; this only spares it the common case.
    """
    if data[:8] != PNG_SIGNATURE:
        return None
    view, pos, header, idat, after_idat = memoryview(data), 8, None, [], False
    while True:
        if pos + 12 > len(data):
            return None
        length, kind = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        expected = PNG_PLAIN_CHUNKS.get(kind, -1)
        if end > len(data) or expected == -1 or (expected is not None and length != expected):
            return None
        if (header is None) != (kind == b"IHDR"):  # IHDR first, and only once
            return None
        if zlib.crc32(view[pos + 4:end - 4]) != int.from_bytes(view[end - 4:end], "big"):
            return None
        if kind == b"IHDR":
            header = struct.unpack_from(">IIBBBBB", data, pos + 8)
        elif kind == b"IDAT":
            if after_idat:
                return None  # image data split by another chunk
            idat.append(view[pos + 8:end - 4])
        elif kind == b"IEND":
            break
        after_idat = after_idat or (bool(idat) and kind != b"IDAT")
        pos = end
    if not idat:
        return None
    w, h, depth, colour, compression, filtering, interlace = header
    depths, channels = PNG_KINDS.get(colour, ((), 0))
    if depth not in depths or compression or filtering or interlace or not 0 < w * h <= max_pixels:
        return None
    stride = 1 + (w * channels * depth + 7) // 8
    return (w, h) if _inflates_to(b"".join(idat), stride, h) else None


def _inflates_to(compressed: bytes, stride: int, rows: int) -> bool:
    """Whether a zlib stream inflates to exactly ``rows`` rows of ``stride`` bytes, each led by a filter 0-4."""
    inflate, done, rest = zlib.decompressobj(), 0, compressed
    try:
        while not inflate.eof:
            chunk = inflate.decompress(rest, INFLATE_STEP)
            rest = inflate.unconsumed_tail
            if not chunk and not rest:
                return False  # the stream ends early
            filters = chunk[(-done) % stride::stride]
            if filters and max(filters) > 4:
                return False
            done += len(chunk)
            if done > stride * rows:
                return False
    except zlib.error:
        return False
    return done == stride * rows


def _save(im, fmt: str, quality: int) -> bytes:
    if fmt == "jpg" and im.mode not in ("RGB", "L"):
        im = im.convert("RGB")
    elif im.mode not in ("RGB", "RGBA", "L", "LA"):
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    buf = io.BytesIO()
    kw = {"quality": quality} if fmt in ("jpg", "webp") else {"optimize": False}
    im.save(buf, format=PIL_SAVE[fmt], **kw)
    return buf.getvalue()


# ---- audio ---------------------------------------------------------------------------------------------------


def encode_audio(data: bytes, ext: str, s: MediaSettings) -> tuple[str, bytes, float, int]:
    """Return (ext, bytes, seconds, rate): decoded, mixed to the channels, resampled, stored as FLAC or WAV."""
    import soundfile as sf

    wav = wav_format(data) if ext == "wav" else None  # raises MediaReject for a truncated WAV
    if wav is not None:
        if not wav.complete:
            data = whole_wav(data, wav)  # sizes filled in: libsndfile reads every frame, a kept file is complete
        if ext == s.audio_format and (wav.rate, wav.channels, wav.tag, wav.bits) == (s.sample_rate or wav.rate,
                                                                                     s.channels, WAVE_FORMAT_PCM, 16):
            if wav.frames == 0:
                raise MediaReject("empty_file", "audio has no samples")
            if wav.frames / wav.rate > s.max_audio_seconds:
                raise MediaReject("too_large", f"audio lasts {wav.frames / wav.rate:.1f} s > max_audio_seconds "
                                  f"{s.max_audio_seconds}; raise max_audio_seconds to keep it")
            return ext, data, wav.frames / wav.rate, wav.rate  # complete 16-bit PCM already in the stored form: keep it
    if wav is not None and wav.tag == WAVE_FORMAT_PCM and wav.bits == 16 and wav.block_align == 2 * wav.channels:
        if wav.frames / wav.rate > s.max_audio_seconds:
            raise MediaReject("too_large", f"audio lasts {wav.frames / wav.rate:.1f} s > max_audio_seconds "
                              f"{s.max_audio_seconds}; raise max_audio_seconds to keep it")
        y, rate = _pcm16(data, wav), wav.rate  # what libsndfile would give, without its per-call set-up
    else:
        try:
            info = sf.info(io.BytesIO(data))
            rate, frames, channels = int(info.samplerate), int(info.frames), int(info.channels)
            if rate > 0 and frames / rate > s.max_audio_seconds:
                raise MediaReject("too_large", f"audio lasts {frames / rate:.1f} s > max_audio_seconds "
                                  f"{s.max_audio_seconds}; raise max_audio_seconds to keep it")
            y, rate = sf.read(io.BytesIO(data), dtype="float32", always_2d=True)  # (N, C)
        except MediaReject:
            raise
        except Exception as e:  # noqa: BLE001 - not a soundfile format: try librosa (audioread)
            y, rate = _librosa_decode(data, wav, e)
    if y.shape[0] == 0:
        raise MediaReject("empty_file", "audio has no samples")
    seconds_in = y.shape[0] / rate
    if seconds_in > s.max_audio_seconds:
        raise MediaReject("too_large", f"audio lasts {seconds_in:.1f} s > max_audio_seconds {s.max_audio_seconds}")
    channels = y.shape[1]
    target = s.sample_rate or rate
    if ext == s.audio_format and rate == target and channels == s.channels:
        return ext, data, y.shape[0] / rate, rate  # already in the stored form: keep the bytes
    y = _mix(y, s.channels)
    if rate != target:
        y = resample(y, rate, target)
    y = np.clip(y, -1.0, 32767 / 32768)
    buf = io.BytesIO()
    sf.write(buf, y, target, format=s.audio_format.upper(), subtype="PCM_16")
    return s.audio_format, buf.getvalue(), y.shape[0] / target, target


def _pcm16(data: bytes, wav: WavFormat) -> np.ndarray:
    """A 16-bit PCM WAV's frames as (N, C) float32 in [-1, 1): sample / 32768, as libsndfile scales them."""
    pcm = np.frombuffer(data, dtype="<i2", count=wav.frames * wav.channels, offset=wav.data_start)
    return pcm.reshape(wav.frames, wav.channels).astype(np.float32) * np.float32(1 / 32768)


def _mix(y: np.ndarray, channels: int) -> np.ndarray:
    """(N, C) -> (N, channels): average to mono, repeat mono, or refuse."""
    c = y.shape[1]
    if c == channels:
        return y
    if channels == 1:
        return y.mean(axis=1, keepdims=True)
    if c == 1:
        return np.repeat(y, channels, axis=1)
    raise MediaReject("unsupported_format", f"audio has {c} channels; cannot map them to {channels}")


def _librosa_decode(data: bytes, wav: WavFormat | None, sf_error: Exception) -> tuple[np.ndarray, int]:
    import tempfile

    try:
        import librosa

        with tempfile.NamedTemporaryFile(suffix=".audio") as f:
            f.write(data)
            f.flush()
            y, rate = librosa.load(f.name, sr=None, mono=False)
    except Exception as e:  # noqa: BLE001
        if wav is not None and wav.tag not in (WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT):  # libsndfile says why
            why = getattr(sf_error, "error_string", None) or sf_error  # without the BytesIO's repr
            raise MediaReject("unsupported_format", f"WAV sample format {wav.describe()} cannot be decoded "
                              f"({why}); convert it to PCM, e.g. ffmpeg -i in.wav -c:a pcm_s16le out.wav") from None
        raise MediaReject("unreadable", f"not a readable audio file ({type(e).__name__}: {e})") from None
    y = np.atleast_2d(y).T.astype(np.float32)  # (C, N) -> (N, C)
    return y, int(rate)


WAVE_FORMAT_PCM, WAVE_FORMAT_IEEE_FLOAT, WAVE_FORMAT_EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
KSDATAFORMAT_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"  # a SubFormat GUID after its tag
PIPE_SIZES = (0, 0xFFFFFFFF)  # RIFF/data sizes of a writer that could not seek back to fill them in (a pipe)
SOX_UNSPEC = 0x7FFFF000  # sox's data size for "length unknown" (src/wav.c MS_UNSPEC), cut to whole blocks


class WavFormat(NamedTuple):  # a tuple: one per WAV a build reads, cheaper to make than a frozen dataclass
    """A RIFF/WAVE file's sample format and where its whole frames lie."""

    rate: int
    channels: int
    tag: int  # format tag; WAVE_FORMAT_EXTENSIBLE is resolved to its SubFormat's tag (1 PCM, 3 float)
    bits: int
    block_align: int  # bytes per frame
    data_start: int  # offset of the first sample byte
    frames: int  # whole frames present
    complete: bool  # the RIFF and data sizes are final: the bytes can be stored as they are

    def describe(self) -> str:
        if self.tag == WAVE_FORMAT_EXTENSIBLE:
            return "0xFFFE (WAVE_FORMAT_EXTENSIBLE with an unknown SubFormat)"
        return f"0x{self.tag:04X}" + (f" ({self.bits} bits)" if self.bits else "")


def wav_format(data: bytes) -> WavFormat | None:
    """The format of a RIFF/WAVE file; None when it is not one, or has no usable fmt chunk (libsndfile decides).

    The data chunk runs to the end of the file when its size is a streaming writer's placeholder:
    0xFFFFFFFF (ffmpeg to a pipe), sox's 0x7ffff000 (when fewer bytes follow), or 0 with sample bytes
    after it that the RIFF size does not cover. Only whole frames count: a pipe cut mid-frame loses
    the part of a frame at its end. Any other size that runs past the end of the file, here or in a chunk
    before the data, raises MediaReject: the file is truncated (libsndfile would quietly read what is there).
    """
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    riff_end = 8 + int.from_bytes(data[4:8], "little")
    pos, fmt = 12, None
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        start, present = pos + 8, len(data) - pos - 8
        if cid == b"data":
            return _data_chunk(fmt, start, size, present, riff_end, len(data))
        if size > present:
            if not all(32 <= b < 127 for b in cid):  # not a chunk id: the walk lost its step
                raise MediaReject("unreadable", f"WAV is malformed: bytes {pos}-{pos + 3} ({cid!r}) are no chunk "
                                  "id (a pad byte missing after an odd-sized chunk?); re-export it")
            raise MediaReject("unreadable", f"WAV is truncated: its {cid.decode('latin-1')!r} chunk declares "
                              f"{size} bytes, only {present} follow; re-export or re-download it")
        if cid == b"fmt " and size >= 16:
            tag, channels, rate, _, align, bits = struct.unpack_from("<HHIIHH", data, start)
            if tag == WAVE_FORMAT_EXTENSIBLE and size >= 40 and data[start + 26:start + 40] == KSDATAFORMAT_TAIL:
                tag = int.from_bytes(data[start + 24:start + 26], "little")  # SubFormat GUID: tag + fixed tail
            fmt = (tag, channels, rate, align, bits)
        pos = start + size + (size & 1)  # odd chunks carry a pad byte
    raise MediaReject("unreadable", "WAV has no data chunk: it holds no samples; re-export it")


def _data_chunk(fmt: tuple[int, int, int, int, int] | None, start: int, size: int, present: int, riff_end: int,
                length: int) -> WavFormat | None:
    align = fmt[3] if fmt is not None else 0
    streaming = (size == 0xFFFFFFFF
                 or size == 0 and present > 0 and (riff_end - 8 in PIPE_SIZES or riff_end < length)
                 or align > 0 and size == SOX_UNSPEC - SOX_UNSPEC % align and size > present)
    if size > present and not streaming:
        raise MediaReject("unreadable", f"WAV is truncated: its data chunk declares {size} bytes, only {present} "
                          "follow; re-export or re-download it")
    if fmt is None or align == 0:
        return None
    tag, channels, rate, _, bits = fmt
    complete = not streaming and start + size <= riff_end <= length + 1  # + 1: a missing last pad byte
    frames = (present if streaming else size) // align
    return WavFormat(rate, channels, tag, bits, align, start, frames, complete)


def whole_wav(data: bytes, wav: WavFormat) -> bytes:
    """``data`` as its writer would have finished it, had it been able to seek back: the RIFF and data sizes
    filled in for the whole frames present. Chunks before the data are kept, any after it dropped."""
    n = wav.frames * wav.block_align
    head = bytearray(data[:wav.data_start])
    struct.pack_into("<I", head, 4, len(head) - 8 + n + (n & 1))
    struct.pack_into("<I", head, len(head) - 4, n)
    return b"".join((head, memoryview(data)[wav.data_start:wav.data_start + n], b"\0" * (n & 1)))


# ---- text ----------------------------------------------------------------------------------------------------


def encode_text(data: bytes) -> tuple[str, bytes, str]:
    """Return ("txt", NFC UTF-8 bytes, text); invalid UTF-8 is a reject."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise MediaReject("bad_text_encoding", f"text is not valid UTF-8 (byte {e.start}); re-save it as "
                          "UTF-8") from None
    text = unicodedata.normalize("NFC", text.removeprefix("\ufeff"))
    return "txt", text.encode("utf-8"), text
