"""mmdata build --resume: a build SIGKILLed part-way ends, once resumed, byte-identical to an uninterrupted one."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import write_folders

from mmdata.build import BuildConfig, build_dataset
from mmdata.cli import main
from mmdata.dataset import open_dataset
from mmdata.errors import ConfigError, DatasetNotFoundError
from mmdata.format import CARD_NAME

# kill the build process from inside after the n-th sample written (mid-shard) or right after the n-th shard rename
KILLER = textwrap.dedent("""
    import os, signal, sys
    from mmdata.build import assemble, runner
    from mmdata.cli import main
    where, n = sys.argv[1], int(sys.argv[2])
    count = [0]
    def bump():
        count[0] += 1
        if count[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
    if where == "sample":
        runner.shard_hook = lambda shard: bump()
    else:
        finish = assemble.ShardFile.finish
        def patched(self):
            out = finish(self)
            bump()
            return out
        assemble.ShardFile.finish = patched
    sys.exit(main(sys.argv[3:]))
""")


def files(out):
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


@pytest.mark.parametrize("where,n", [("sample", 17), ("shard", 2)])
def test_resume_after_sigkill_is_byte_identical(tmp_path, where, n):
    raw = write_folders(tmp_path / "raw", n=40)
    args = ["build", str(raw), "--max-samples", "6", "--split-by", "speaker", "--val", "0.25", "--workers", "1",
            "--no-progress"]
    assert main([*args[:2], str(tmp_path / "ref"), *args[2:]]) == 0
    ref = files(tmp_path / "ref")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-c", KILLER, where, str(n), *args[:2], str(out), *args[2:]],
                          capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    assert not (out / CARD_NAME).exists()
    finished = [p.name for p in out.iterdir() if p.name.endswith(".tar")]
    assert finished, "the kill should come after at least one finished shard"
    for name in finished:  # a file with a final name is always a complete shard
        assert (out / name).read_bytes() == ref[name]
    with pytest.raises(ConfigError, match="--resume"):
        build_dataset(raw, out, BuildConfig(workers=1), progress=False)
    with pytest.raises(DatasetNotFoundError, match="holds an interrupted build: .* with --resume"):
        open_dataset(out)  # the reader points at --resume, not at another build
    assert main([*args[:2], str(out), *args[2:], "--resume"]) == 0
    assert files(out) == ref


def test_resume_refuses_a_different_build(tmp_path):
    raw = write_folders(tmp_path / "raw", n=12)
    out = tmp_path / "out"
    out.mkdir()
    (out / ".mmdata-build.jsonl").write_text('{"fingerprint": "other", "splits": ["train"]}\n')
    (out / "train-000000.tar").write_bytes(b"junk")
    with pytest.raises(ConfigError, match="other input or config"):
        build_dataset(raw, out, BuildConfig(workers=1), progress=False, resume=True)
    card = build_dataset(raw, out, BuildConfig(workers=1), progress=False, resume=True, overwrite=True)
    assert card.counts["written"] == 12 and (out / "train-000000.tar").stat().st_size > 4
