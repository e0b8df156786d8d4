"""The package surface a newcomer touches first: errors, CLI help, tasks and the shard format."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest

from mmdata.build.assemble import ShardFile
from mmdata.errors import ConfigError, MmdataError, SchemaError
from mmdata.format import MAX_KEY, group_samples, make_key, member_header, parse_members
from mmdata.tasks import BadLabel, Task, infer_task


def test_errors_inherit_builtins():
    assert issubclass(SchemaError, ValueError) and issubclass(SchemaError, MmdataError)
    with pytest.raises(ValueError):
        raise ConfigError("max_samples must be positive, got 0")


@pytest.mark.parametrize("cmd", [["-m", "mmdata", "--help"], ["-m", "mtml_models", "--help"]])
def test_module_help(cmd):
    out = subprocess.run([sys.executable, *cmd], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout


def test_shards_are_byte_identical_and_tar_readable():
    def write():
        w = ShardFile("train-000000.tar")
        spans = [w.write_sample(f"k{i}", {"txt": str(i).encode(), "json": b"{}"}) for i in range(5)]
        info = w.finish()
        return w.data, spans, (info.bytes, info.sha256)

    a, spans, (size, sha) = write()
    b, _, (_, sha2) = write()
    assert a == b and sha == sha2 and size == len(a)
    assert tarfile.open(fileobj=io.BytesIO(a)).getnames()[:2] == ["k0.txt", "k0.json"]
    off, n = spans[3]
    assert list(group_samples(parse_members(a[off:off + n]))) == [("k3", {"txt": b"3", "json": b"{}"})]


def test_truncated_member_is_reported():
    w = ShardFile("a.tar")
    w.write_sample("a", {"txt": b"x" * 1000})
    w.finish()
    with pytest.raises(ValueError, match="truncated"):
        list(parse_members(w.data[:900]))


def test_keys_are_valid_and_distinct():
    assert make_key("0_george_1") == "0_george_1"
    a, b = make_key("a b.c"), make_key("a_b_c")
    assert a != b and "." not in a
    assert make_key("x" * MAX_KEY) == "x" * MAX_KEY  # valid ids that fit are kept as they are
    long_a, long_b = make_key("x" * 300), make_key("x" * 301)
    assert long_a != long_b and len(long_a) <= MAX_KEY
    ShardFile("a.tar").write_sample("x" * MAX_KEY, {"flac": b"1"})  # KEY.flac fits a ustar name


@pytest.mark.parametrize("name,size", [("a.png", 0), ("0_george_0.wav", 12345), ("k.json", 511),
                                       ("x" * 95 + ".flac", 8**11 - 1)])
def test_member_header_is_what_tarfile_writes(name, size):
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, 0, 0o644, 0, 0, "", ""
    assert member_header(name, size) == info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def test_task_encoding_rejects_bad_labels():
    t = Task("digit", "classification", tuple(str(i) for i in range(10)))
    assert t.encode(3) == 3 and t.encode("7") == 7 and t.encode(None) is None
    with pytest.raises(BadLabel, match="not a declared class"):
        t.encode(11)
    r = Task("age", "regression")
    with pytest.raises(BadLabel, match="NaN"):
        r.encode(float("nan"))
    assert infer_task("x", [0.5, 1.25, None]).type == "regression"
    assert infer_task("d", [1, 10, 2]).classes == ("1", "2", "10")
    assert infer_task("m", [["a", "b"], ["c"]]).type == "multilabel"


# ---- the one tar reader (format): the loader's reader, verify and show use it --------------------------------


def _archive(n: int) -> tuple[bytes, list[int]]:
    """A shard of ``n`` samples k0.. (txt + json) with its end blocks; and each sample's byte offset."""
    from mmdata.format import archive_bytes, sample_block

    blocks = [sample_block(f"k{i}", {"txt": b"x" * (100 * i + 1), "json": b"{}"}) for i in range(n)]
    offsets = [sum(len(b) for b in blocks[:i]) for i in range(n)]
    body = b"".join(blocks)
    return body + bytes(archive_bytes(len(body)) - len(body)), offsets


def test_tar_reader_counts_shard_bytes_and_reports_instead_of_raising():
    from mmdata.format import TarError, TarStream, tar_members

    data, offsets = _archive(3)
    bad = bytearray(data)
    bad[offsets[1] + 130] ^= 0x01  # the second sample's first header: its checksum no longer holds
    with pytest.raises(TarError) as caught:
        list(tar_members(TarStream(bytes(bad))))
    assert (caught.value.pos, str(caught.value)) == (offsets[1], f"corrupt tar header at byte {offsets[1]}")
    assert caught.value.detail == f"corrupt tar header at byte {offsets[1]}: checksum mismatch"
    reported = []

    def resync(e: TarError) -> int:  # report, and read on from the next sample
        reported.append(e.pos)
        return offsets[2]

    names = [(pos, name) for pos, name, _ in tar_members(TarStream(bytes(bad)), on_error=resync)]
    assert reported == [offsets[1]]
    assert names == [(offsets[0], "k0.txt"), (offsets[0] + 1024, "k0.json"), (offsets[2], "k2.txt"),
                     (offsets[2] + 1024, "k2.json")]
    with pytest.raises(TarError, match="no end-of-archive blocks") as caught:
        list(tar_members(TarStream(data[:offsets[2]])))  # a whole shard must end with zero blocks
    assert caught.value.final


def test_sample_parse_names_absolute_offsets():
    data, offsets = _archive(3)
    run = data[offsets[2]:]
    assert list(group_samples(parse_members(run[:2048], base=offsets[2]))) == [("k2", {"txt": b"x" * 201,
                                                                                      "json": b"{}"})]
    broken = bytearray(run[:2048])
    broken[1024 + 130] ^= 0x01  # k2.json's header
    with pytest.raises(ValueError, match=f"^corrupt tar header at byte {offsets[2] + 1024}$"):
        list(parse_members(bytes(broken), base=offsets[2]))


def test_tar_stream_hashes_every_byte_and_reads_no_further_than_its_limit():
    import hashlib

    from mmdata.format import TarStream, tar_members

    data, _ = _archive(4)
    f = io.BytesIO(data + b"tail the card does not count")
    stream = TarStream(f, limit=len(data), sha256=True)
    assert [name for _, name, _ in tar_members(stream)] == [f"k{i}.{e}" for i in range(4) for e in ("txt", "json")]
    assert stream.digest() == hashlib.sha256(data).hexdigest()  # members skipped, not read, are hashed too
    assert f.tell() <= len(data)


def test_the_version_has_one_source():
    from importlib.metadata import version

    import mmdata
    from mmdata.card import Card
    from mmdata.tasks import TaskList

    assert mmdata.__version__ == version("mmdata")  # pyproject.toml, as installed
    assert Card(modalities={}, tasks=TaskList(()), splits={}).tool_version == mmdata.__version__
