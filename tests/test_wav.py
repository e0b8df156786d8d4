"""WAV inputs the way tools write them build, and the stored audio holds the input's samples.

Every file here is written byte by byte with struct: piped output whose size fields were never filled in
(ffmpeg's 0xFFFFFFFF, sox's 0x7ffff000 placeholder, zeros), WAVE_FORMAT_EXTENSIBLE, 24-bit PCM, float32,
stereo, and chunks before and after the data. Sample n of channel c encodes (n, c), and each case carries
the same samples in a plain, complete WAV: the reference soundfile reads in full. A file that really is
truncated is still rejected ``unreadable``.
"""

from __future__ import annotations

import io
import json
import struct
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from mmdata.build import BuildConfig, build_dataset
from mmdata.errors import RejectThresholdError

RATE = 8000
FRAMES = 1000
PIPE = 0xFFFFFFFF  # ffmpeg -f wav pipe: leaves the RIFF and data sizes at -1
SOX_UNSPEC = 0x7FFFF000  # sox's "length unknown" (src/wav.c MS_UNSPEC), rounded down to whole blocks
KSDATAFORMAT_TAIL = b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"  # GUID after its 2-byte tag
PCM, FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
CONFIG = BuildConfig(workers=1, tokenizer_vocab=0)


# ---- writing WAVs by hand -------------------------------------------------------------------------------------


def chunk(cid: bytes, body: bytes, size: int | None = None, pad: bool = True) -> bytes:
    """One RIFF chunk; ``size`` overrides the declared size, odd bodies get their pad byte."""
    return cid + struct.pack("<I", len(body) if size is None else size) + body + (b"\0" * (len(body) & 1) * pad)


def riff(*chunks: bytes, size: int | None = None) -> bytes:
    body = b"WAVE" + b"".join(chunks)
    return b"RIFF" + struct.pack("<I", len(body) if size is None else size) + body


def fmt(tag: int, channels: int, bits: int, extensible: bool = False, cb_size: bool = False) -> bytes:
    """A fmt chunk: 16 bytes, 18 with a cbSize of 0 (sox's float), or 40 for WAVE_FORMAT_EXTENSIBLE."""
    align = channels * bits // 8
    head = struct.pack("<HHIIHH", EXTENSIBLE if extensible else tag, channels, RATE, RATE * align, align, bits)
    if extensible:  # cbSize 22, valid bits, channel mask, SubFormat GUID
        mask = {1: 0x4, 2: 0x3}[channels]
        head += struct.pack("<HHI", 22, bits, mask) + struct.pack("<H", tag) + KSDATAFORMAT_TAIL
    elif cb_size:
        head += struct.pack("<H", 0)
    return chunk(b"fmt ", head)


def info_list(text: bytes) -> bytes:
    """A LIST/INFO chunk with one ISFT item (ffmpeg writes one before the data; tools also append them)."""
    return chunk(b"LIST", b"INFO" + chunk(b"ISFT", text))


def samples(kind: str, frames: int, channels: int) -> tuple[np.ndarray, bytes]:
    """((frames, channels) true values in [-1, 1), little-endian sample bytes); each value encodes (n, c)."""
    n = np.arange(frames)[:, None]  # (N, 1)
    c = np.arange(channels)[None, :]  # (1, C)
    if kind == "s16":
        v = ((n * 97 + c * 5003) % 60000 - 30000).astype("<i2")  # (N, C)
        return v / 32768.0, v.tobytes()
    if kind == "s24":
        v = ((n * 99991 + c * 777777) % 16_000_000 - 8_000_000).astype("<i4")  # (N, C)
        raw = v.reshape(-1, 1).view(np.uint8)[:, :3]  # (N * C, 3): the low three bytes of each value
        return v / 2.0**23, raw.tobytes()
    v = (0.9 * np.sin(n * 0.01 * (c + 1)) + n * 1e-5).astype("<f4")  # (N, C)
    return v.astype(np.float64), v.tobytes()


@dataclass(frozen=True)
class Case:
    data: bytes  # the input file
    reference: bytes  # the same samples in a plain, complete WAV
    truth: np.ndarray  # (N, C) float64 values the samples stand for
    kind: str


def case(kind: str, channels: int, make, frames: int = FRAMES) -> Case:
    """``make(fmt_chunk, sample_bytes) -> file bytes`` writes the input; the reference is plain and complete."""
    truth, pcm = samples(kind, frames, channels)
    tag, bits = (FLOAT, 32) if kind == "f32" else (PCM, int(kind[1:]))
    reference = riff(fmt(tag, channels, bits), chunk(b"data", pcm))
    return Case(make(tag, bits, channels, pcm), reference, truth, kind)


CASES = {
    # ffmpeg -f wav pipe:1 (s16le): a LIST/INFO before the data, both sizes left at 0xFFFFFFFF, no pad byte
    "ffmpeg_pipe_s16": case("s16", 1, lambda t, b, c, pcm: riff(
        fmt(t, c, b), info_list(b"Lavf61.7.100\0"), chunk(b"data", pcm, PIPE, pad=False), size=PIPE)),
    # ffmpeg writes more than 16 bits as WAVE_FORMAT_EXTENSIBLE
    "ffmpeg_pipe_s24_stereo_extensible": case("s24", 2, lambda t, b, c, pcm: riff(
        fmt(t, c, b, extensible=True), chunk(b"data", pcm, PIPE, pad=False), size=PIPE)),
    "ffmpeg_pipe_f32_extensible": case("f32", 1, lambda t, b, c, pcm: riff(
        fmt(t, c, b, extensible=True), chunk(b"data", pcm, PIPE, pad=False), size=PIPE)),
    # a pipe cut mid-frame: the partial frame (3 of 4 bytes) is dropped
    "ffmpeg_pipe_s16_stereo_partial_frame": case("s16", 2, lambda t, b, c, pcm: riff(
        fmt(t, c, b), chunk(b"data", pcm + b"\x01\x02\x03", PIPE, pad=False), size=PIPE)),
    # sox to a pipe: data size MS_UNSPEC rounded down to whole blocks, RIFF size to match; float and
    # extensible get a fact chunk with the same placeholder count
    "sox_pipe_s16": case("s16", 1, lambda t, b, c, pcm: riff(
        fmt(t, c, b), chunk(b"data", pcm, SOX_UNSPEC, pad=False), size=4 + 24 + 8 + SOX_UNSPEC)),
    "sox_pipe_f32": case("f32", 1, lambda t, b, c, pcm: riff(
        fmt(t, c, b, cb_size=True), chunk(b"fact", struct.pack("<I", SOX_UNSPEC // 4)),
        chunk(b"data", pcm, SOX_UNSPEC, pad=False), size=4 + 26 + 12 + 8 + SOX_UNSPEC)),
    "sox_pipe_s24_stereo_extensible": case("s24", 2, lambda t, b, c, pcm: riff(
        fmt(t, c, b, extensible=True), chunk(b"fact", struct.pack("<I", SOX_UNSPEC // 6)),
        chunk(b"data", pcm, SOX_UNSPEC // 6 * 6, pad=False), size=4 + 48 + 12 + 8 + SOX_UNSPEC // 6 * 6)),
    # size fields left at zero (libsndfile reads 0 frames from these: the build must not)
    "zero_sizes": case("s16", 1, lambda t, b, c, pcm: riff(
        fmt(t, c, b), chunk(b"data", pcm, 0, pad=False), size=0)),
    "header_only_sizes": case("s16", 2, lambda t, b, c, pcm: riff(  # Python's wave to a pipe: RIFF 36, data 0
        fmt(t, c, b), chunk(b"data", pcm, 0, pad=False), size=36)),
    # complete files of every sample format
    "extensible_s16": case("s16", 1, lambda t, b, c, pcm: riff(fmt(t, c, b, extensible=True), chunk(b"data", pcm))),
    "extensible_f32_stereo": case("f32", 2, lambda t, b, c, pcm: riff(
        fmt(t, c, b, extensible=True), chunk(b"data", pcm))),
    "s24": case("s24", 1, lambda t, b, c, pcm: riff(fmt(t, c, b), chunk(b"data", pcm))),
    "f32": case("f32", 1, lambda t, b, c, pcm: riff(fmt(t, c, b, cb_size=True), chunk(b"data", pcm))),
    "s16_stereo": case("s16", 2, lambda t, b, c, pcm: riff(fmt(t, c, b), chunk(b"data", pcm))),
    # extra chunks: LIST after the data; JUNK and bext before fmt; odd-sized chunks with their pad byte
    "list_after_data": case("s16", 1, lambda t, b, c, pcm: riff(
        fmt(t, c, b), chunk(b"data", pcm), info_list(b"odd text\0\0\0"))),
    "junk_bext_odd_chunks": case("s16", 1, lambda t, b, c, pcm: riff(
        chunk(b"JUNK", bytes(28)), chunk(b"bext", bytes(603)), fmt(t, c, b), chunk(b"odd ", b"abc"),
        chunk(b"data", pcm), chunk(b"id3 ", b"xyz"))),
    "s24_odd_data_then_list": case("s24", 1, lambda t, b, c, pcm: riff(
        fmt(t, c, b), chunk(b"data", pcm), info_list(b"after\0")), frames=101),
}


# ---- building ---------------------------------------------------------------------------------------------------


def build_one(tmp_path: Path, data: bytes, config: BuildConfig = CONFIG) -> tuple[dict, dict[str, bytes]]:
    """Build a one-sample dataset from ``data`` as audio.wav; return (card counts, the sample's members)."""
    (tmp_path / "raw" / "clip").mkdir(parents=True)
    (tmp_path / "raw" / "clip" / "audio.wav").write_bytes(data)
    card = build_dataset(tmp_path / "raw", tmp_path / "out", config, progress=False)
    members = {}
    for shard in sorted((tmp_path / "out").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar:
                members[m.name.rpartition(".")[2]] = tar.extractfile(m).read()
    return card.counts, members


def rejects_of(tmp_path: Path, data: bytes) -> list[dict]:
    with pytest.raises(RejectThresholdError):
        build_one(tmp_path, data)
    return [json.loads(line) for line in (tmp_path / "out" / "rejects.jsonl").read_text().splitlines()]


def read(data: bytes, dtype: str) -> np.ndarray:
    import soundfile as sf

    y, _ = sf.read(io.BytesIO(data), dtype=dtype, always_2d=True)  # (N, C)
    return y


# ---- tests -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_files_hold_the_samples(name):
    """The hand-written references are what they claim: soundfile reads the true values back exactly."""
    c = CASES[name]
    np.testing.assert_array_equal(read(c.reference, "float64"), c.truth)


@pytest.mark.parametrize("name", sorted(CASES))
def test_wav_builds_to_the_same_samples(name, tmp_path):
    import soundfile as sf

    c = CASES[name]
    counts, members = build_one(tmp_path, c.data)
    assert counts == {"input": 1, "written": 1, "rejected": {}}
    assert sf.info(io.BytesIO(members["flac"])).subtype == "PCM_16"
    stored = read(members["flac"], "int16")[:, 0].astype(np.int64)  # (N,)
    # exactly what the build's conversion gives: float32 as soundfile reads it, mean over channels, 16 bits
    mono = read(c.reference, "float32").mean(axis=1)  # (N,)
    np.testing.assert_array_equal(stored, np.clip(np.rint(mono.astype(np.float64) * 32768), -32768, 32767))
    # and within half a 16-bit step of the true mix of the values written (a step where the mix clips)
    err = np.abs(stored / 32768 - np.clip(c.truth.mean(axis=1), -1, 32767 / 32768))
    assert err.max() <= 0.5 / 32768 + 1e-7
    if c.kind == "s16" and c.truth.shape[1] == 1:  # 16-bit mono: the very same integers
        np.testing.assert_array_equal(stored, np.rint(c.truth[:, 0] * 32768))
    card = json.loads((tmp_path / "out" / "dataset.json").read_text())
    assert card["modalities"]["audio"]["sample_rate"] == RATE
    (row,) = pq.read_table(tmp_path / "out" / "index.parquet", columns=["audio_seconds"]).to_pylist()
    assert row["audio_seconds"] == pytest.approx(len(c.truth) / RATE)


@pytest.mark.parametrize("name", ["ffmpeg_pipe_s16_stereo_partial_frame", "s24", "f32"])
def test_resampled_audio_is_librosas_soxr_hq_resample(name, tmp_path):
    """Resampling is librosa.resample's default (soxr HQ, the length ceil(N * ratio)), sample for sample."""
    import librosa

    c = CASES[name]
    counts, members = build_one(tmp_path, c.data, BuildConfig(workers=1, tokenizer_vocab=0, sample_rate=22050))
    assert counts["written"] == 1
    mono = read(c.reference, "float32").mean(axis=1)  # (N,)
    want = librosa.resample(mono, orig_sr=RATE, target_sr=22050)
    assert len(want) == -(-len(mono) * 22050 // RATE)
    stored = read(members["flac"], "int16")[:, 0].astype(np.int64)
    np.testing.assert_array_equal(stored, np.clip(np.rint(want.astype(np.float64) * 32768), -32768, 32767))


@pytest.mark.parametrize("name", ["ffmpeg_pipe_s16", "ffmpeg_pipe_s16_stereo_partial_frame",
                                  "ffmpeg_pipe_s24_stereo_extensible", "s24_odd_data_then_list"])
def test_soundfile_reads_the_input_as_the_reference(name):
    """Where libsndfile reads the input to its end, it agrees with the reference: the build agrees with both."""
    c = CASES[name]
    np.testing.assert_array_equal(read(c.data, "float32"), read(c.reference, "float32"))


@pytest.mark.parametrize("name", ["ffmpeg_pipe_s16", "zero_sizes", "sox_pipe_s16",
                                  "ffmpeg_pipe_s16_stereo_partial_frame"])
def test_piped_wav_is_stored_as_a_complete_wav(name, tmp_path):
    """Stored as WAV, a piped file gets its sizes written in: any WAV reader then sees every frame."""
    import wave

    c = CASES[name]
    channels = c.truth.shape[1]
    counts, members = build_one(tmp_path, c.data, BuildConfig(workers=1, tokenizer_vocab=0, audio_format="wav",
                                                              channels=channels))
    assert counts["written"] == 1
    blob = members["wav"]
    assert struct.unpack_from("<I", blob, 4)[0] == len(blob) - 8
    with wave.open(io.BytesIO(blob)) as w:  # the standard library's reader trusts the sizes
        assert (w.getnframes(), w.getnchannels(), w.getframerate()) == (FRAMES, channels, RATE)
        got = np.frombuffer(w.readframes(FRAMES), "<i2").reshape(FRAMES, channels)
    np.testing.assert_array_equal(got, np.rint(c.truth * 32768))


def test_complete_16_bit_wav_is_kept_byte_for_byte(tmp_path):
    """The fast path is unchanged: a complete 16-bit PCM file in the stored form is kept as it is."""
    c = CASES["list_after_data"]
    _, members = build_one(tmp_path, c.data, BuildConfig(workers=1, tokenizer_vocab=0, audio_format="wav"))
    assert members["wav"] == c.data


def test_wav_format_reads_every_header():
    """Rate, channels, sample format and whole frames from the header; complete only where every size is final."""
    from mmdata.build.media import wav_format

    for name, c in CASES.items():
        w = wav_format(c.data)
        assert w is not None, name
        assert (w.rate, w.channels, w.frames) == (RATE, c.truth.shape[1], len(c.truth)), name
        assert (w.tag, w.bits) == ((FLOAT, 32) if c.kind == "f32" else (PCM, int(c.kind[1:]))), name
        assert w.complete == ("pipe" not in name and "sizes" not in name), name


def _truncated() -> dict[str, tuple[bytes, str, str]]:
    """name -> (file, reason, words in the message)."""
    _, pcm = samples("s16", FRAMES, 1)
    full = riff(fmt(PCM, 1, 16), chunk(b"data", pcm))
    before = riff(fmt(PCM, 1, 16), info_list(b"x" * 100), chunk(b"data", pcm))
    return {
        "data_cut": (full[:-501], "unreadable", "truncated: its data chunk declares 2000 bytes"),
        "cut_in_a_chunk_before_data": (before[:60], "unreadable", "truncated"),
        "no_data_chunk": (riff(fmt(PCM, 1, 16), info_list(b"x")), "unreadable", "no data chunk"),
        "missing_pad_byte": (riff(fmt(PCM, 1, 16), chunk(b"odd ", b"abc", pad=False), chunk(b"data", pcm)),
                             "unreadable", "pad byte missing"),  # libsndfile cannot read it either
        "pipe_with_part_of_one_frame": (riff(fmt(PCM, 2, 16), chunk(b"data", b"\1\2\3", PIPE, pad=False), size=PIPE),
                                        "empty_file", "no samples"),
        # data size 0 inside a RIFF size that covers the file: an empty recording, not a piped one
        "empty_then_list": (riff(fmt(PCM, 1, 16), chunk(b"data", b""), info_list(b"abc\0")), "empty_file",
                            "no samples"),
        "mp3_in_wav": (riff(chunk(b"fmt ", struct.pack("<HHIIHHH", 0x0055, 1, RATE, 2000, 1, 0, 0)),
                            chunk(b"data", bytes(417))), "unsupported_format", "0x0055"),
    }


@pytest.mark.parametrize("name", sorted(_truncated()))
def test_bad_wav_is_rejected_with_its_reason(name, tmp_path):
    data, reason, words = _truncated()[name]
    (reject,) = rejects_of(tmp_path, data)
    assert reject["reason"] == reason and words in reject["message"], reject
