"""The package surface a newcomer touches first: errors, CLI help, tasks and the shard format."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile

import pytest

from mmdata.errors import ConfigError, MmdataError, SchemaError
from mmdata.format import MAX_KEY, ShardWriter, group_samples, make_key, member_header, parse_members
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
        buf = io.BytesIO()
        w = ShardWriter(buf)
        spans = [w.add(f"k{i}", {"txt": str(i).encode(), "json": b"{}"}) for i in range(5)]
        closed = w.close()
        return buf.getvalue(), spans, closed

    a, spans, (size, sha) = write()
    b, _, (_, sha2) = write()
    assert a == b and sha == sha2 and size == len(a)
    assert tarfile.open(fileobj=io.BytesIO(a)).getnames()[:2] == ["k0.txt", "k0.json"]
    off, n = spans[3]
    assert list(group_samples(parse_members(a[off:off + n]))) == [("k3", {"txt": b"3", "json": b"{}"})]


def test_truncated_member_is_reported():
    buf = io.BytesIO()
    w = ShardWriter(buf)
    w.add("a", {"txt": b"x" * 1000})
    w.close()
    with pytest.raises(ValueError, match="truncated"):
        list(parse_members(buf.getvalue()[:900]))


def test_keys_are_valid_and_distinct():
    assert make_key("0_george_1") == "0_george_1"
    a, b = make_key("a b.c"), make_key("a_b_c")
    assert a != b and "." not in a
    assert make_key("x" * MAX_KEY) == "x" * MAX_KEY  # valid ids that fit are kept as they are
    long_a, long_b = make_key("x" * 300), make_key("x" * 301)
    assert long_a != long_b and len(long_a) <= MAX_KEY
    ShardWriter(io.BytesIO()).add("x" * MAX_KEY, {"flac": b"1"})  # KEY.flac fits a ustar name


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
