"""The conventions both command lines keep: --version, -v/-q anywhere, --json, exit codes, storage options."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import fsspec
import pytest
from conftest import write_folders
from fsspec.implementations.memory import MemoryFileSystem

import mmdata
import mmdata.info
from mmdata.build import BuildConfig, build_dataset
from mmdata.cli import main
from mmdata.errors import RejectThresholdError
from mtml_models.cli import main as mtml_main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Path:
    """8 samples and 1 reject (an empty image), in shards of 4."""
    base = tmp_path_factory.mktemp("cli")
    raw = write_folders(base / "raw", n=8)
    (raw / "x_empty").mkdir()
    (raw / "x_empty" / "image.png").write_bytes(b"")
    build_dataset(raw, base / "ds", BuildConfig(max_samples=4, workers=1, tokenizer_vocab=40,
                                                max_reject_fraction=0.5), progress=False)
    return base / "ds"


def test_version_of_both_commands(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mmdata {mmdata.__version__}"
    assert mtml_main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mtml {mmdata.__version__}"


@pytest.mark.parametrize("argv", [["info", "DS", "-v"], ["-v", "info", "DS"], ["info", "-q", "DS"],
                                  ["-q", "info", "DS"]])
def test_verbose_and_quiet_go_before_or_after_the_subcommand(built, capsys, argv):
    argv = [str(built) if a == "DS" else a for a in argv]
    assert main(argv) == 0
    out = capsys.readouterr().out
    if "-q" in argv:
        assert out == ""  # -q: no summary
    else:
        assert "train" in out and "samples" in out


def test_verbose_and_quiet_together_is_a_usage_error(built, capsys):
    assert main(["info", str(built), "-v", "-q"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_build_json_summary(tmp_path, capsys):
    raw = write_folders(tmp_path / "raw", n=6)
    (raw / "x_empty").mkdir()
    (raw / "x_empty" / "image.png").write_bytes(b"")
    status = main(["build", str(raw), str(tmp_path / "ds"), "--json", "--workers", "1", "--max-samples", "4",
                   "--set", "max_reject_fraction=0.5", "--set", "tokenizer_vocab=40"])
    captured = capsys.readouterr()
    assert status == 0, captured.err
    summary = json.loads(captured.out)  # nothing but the JSON on stdout
    assert summary["ok"] is True and summary["error"] is None
    assert summary["input"] == 7 and summary["written"] == 6
    assert summary["rejected"] == {"total": 1, "by_reason": {"empty_file": 1}}
    shards = sorted(p.name for p in (tmp_path / "ds").glob("*.tar"))
    assert summary["shards"] == len(shards) == 2
    assert summary["bytes"] == sum((tmp_path / "ds" / s).stat().st_size for s in shards)
    assert summary["seconds"] > 0
    assert summary["tasks"]["digit"] == {"type": "classification", "classes": 3, "missing": 1}  # sample 4 has none


def test_rejects_over_the_limit_raise_after_the_dataset_is_written(tmp_path, capsys):
    raw = write_folders(tmp_path / "raw", n=4)
    (raw / "x_empty").mkdir()
    (raw / "x_empty" / "image.png").write_bytes(b"")  # 1 of 5 rejected: 0.2 > 0.1
    config = BuildConfig(workers=1, tokenizer_vocab=40, max_reject_fraction=0.1)
    with pytest.raises(RejectThresholdError, match="max_reject_fraction") as caught:
        build_dataset(raw, tmp_path / "py", config, progress=False)
    assert caught.value.card.counts["written"] == 4
    assert (tmp_path / "py" / "dataset.json").is_file()
    assert json.loads((tmp_path / "py" / "rejects.jsonl").read_text())["source_id"] == "x_empty"

    status = main(["build", str(raw), str(tmp_path / "cli"), "--json", "--workers", "1",
                   "--set", "max_reject_fraction=0.1", "--set", "tokenizer_vocab=40"])
    captured = capsys.readouterr()
    assert status == 1
    summary = json.loads(captured.out)
    assert summary["ok"] is False and "max_reject_fraction" in summary["error"]
    assert summary["written"] == 4 and summary["rejected"]["total"] == 1
    assert "max_reject_fraction" in captured.err and (tmp_path / "cli" / "dataset.json").is_file()


def test_verify_json_lists_each_failure_and_a_corrupt_shard_exits_1(built, tmp_path, capsys):
    assert main(["verify", str(built), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"dataset": str(built), "ok": True, "decoded": False,
                                                   "failures": []}
    copy = tmp_path / "ds"
    copy.mkdir()
    for f in built.rglob("*"):
        if f.is_file():
            (copy / f.relative_to(built)).parent.mkdir(parents=True, exist_ok=True)
            (copy / f.relative_to(built)).write_bytes(f.read_bytes())
    shard = copy / "train-000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0x01
    shard.write_bytes(bytes(data))
    assert main(["verify", str(copy), "--json", "-q"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False
    assert [(f["shard"], f["key"]) for f in report["failures"]] == [("train-000000.tar", None)]
    assert "sha256" in report["failures"][0]["reason"]


@pytest.mark.parametrize("argv", [["build", "a", "b", "--no-such-flag"], ["verify"], ["frobnicate"], [],
                                  ["info", "x", "--storage-options", "[1]"]])
def test_usage_errors_exit_2(capsys, argv):
    assert main(argv) == 2
    assert capsys.readouterr().err


def test_config_errors_exit_2_with_one_line(tmp_path, capsys):
    write_folders(tmp_path / "raw", n=2)
    assert main(["build", str(tmp_path / "raw"), str(tmp_path / "ds"), "--set", "no_such_key=1"]) == 2
    err = capsys.readouterr().err
    assert "unknown build config keys ['no_such_key']" in err and "Traceback" not in err
    assert mtml_main(["train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "run")]) == 2
    assert mtml_main(["train", "--bogus"]) == 2


def test_an_internal_error_is_one_line_exit_3_and_its_traceback_comes_with_v(built, monkeypatch, capsys):
    def broken(args):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(mmdata.info, "run", broken)
    assert main(["info", str(built)]) == 3
    err = capsys.readouterr().err
    assert err.splitlines() == ["mmdata info: internal error: ZeroDivisionError: a bug "
                                "(rerun with -v for the traceback)"]
    assert main(["info", str(built), "-v"]) == 3
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in broken" in err


class GuardedFileSystem(MemoryFileSystem):
    """An in-memory store that refuses to open without the right token: proves options reach fsspec."""

    protocol = "guarded"
    store: dict = {}  # its own, not memory://'s
    pseudo_dirs = [""]

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.removeprefix("guarded://") if isinstance(path, str) else path)

    def __init__(self, token=None, **kw):
        if token != "secret":
            raise PermissionError(f"guarded:// needs token='secret', got {token!r}")
        super().__init__(**kw)


@pytest.fixture
def guarded(built):
    fsspec.register_implementation("guarded", GuardedFileSystem, clobber=True)
    fs = GuardedFileSystem(token="secret")
    for f in built.rglob("*"):
        if f.is_file():
            fs.pipe(f"/ds/{f.relative_to(built).as_posix()}", f.read_bytes())
    yield "guarded://ds"
    GuardedFileSystem.store.clear()
    GuardedFileSystem.clear_instance_cache()


@pytest.mark.parametrize("command", [["info", "--json"], ["verify", "--decode"], ["show", "-o", "OUT.png"],
                                     ["stats", "-o", "OUT.png"]])
def test_every_reading_command_takes_storage_options(guarded, command, tmp_path, capsys):
    argv = [command[0], guarded, *[str(tmp_path / "x.png") if a == "OUT.png" else a for a in command[1:]]]
    assert main(argv) == 1  # without the token the store refuses: a system error, one line
    assert "guarded:// needs token='secret'" in capsys.readouterr().err
    GuardedFileSystem.clear_instance_cache()
    assert main([*argv, "--storage-options", '{"token": "secret"}']) == 0, capsys.readouterr().err
    if command[0] in ("show", "stats"):
        assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_every_build_config_key_is_documented_in_help_and_docs(capsys):
    assert main(["build", "--help"]) == 0
    help_text = capsys.readouterr().out
    docs = (ROOT / "docs" / "build-config.md").read_text()
    for f in dataclasses.fields(BuildConfig):
        assert re.search(rf"^  {f.name} \(default ", help_text, re.M), f"{f.name} missing from build --help"
        assert f.metadata["doc"].split(";")[0][:30] in " ".join(help_text.split()), f.name
        assert re.search(rf"^\| `{f.name}` \|", docs, re.M), f"{f.name} missing from docs/build-config.md"
    assert "docs/build-config.md" in (ROOT / "README.md").read_text()


def test_the_console_scripts_run_as_modules():
    for module in ("mmdata", "mtml_models"):
        done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True,
                              timeout=120)
        assert done.returncode == 0 and done.stdout.startswith(("mmdata ", "mtml ")), done.stderr


DEVELOPER_PATHS = re.compile(r"(?:^|[\s\"'=(`])/(?:work|home|Users|root)/")


def test_no_file_names_a_path_of_a_developers_machine():
    offenders = []
    for sub in ("mmdata", "mtml_models", "tools", "tests", "configs"):
        for path in (ROOT / sub).rglob("*"):
            if path.suffix in (".py", ".sh", ".yaml", ".yml", ".md", ".toml") and path != Path(__file__):
                for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                    if DEVELOPER_PATHS.search(line):
                        offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    for name in ("Makefile", "README.md", "BENCHMARKS.md", "pyproject.toml"):
        text = (ROOT / name).read_text()
        offenders += [f"{name}: {m.group()}" for m in DEVELOPER_PATHS.finditer(text)]
    assert offenders == []


def test_a_full_disk_is_one_line_and_exit_1(tmp_path, monkeypatch, capsys):
    import errno

    import mmdata.build.finish

    def full(*args):  # atomic_write(path, data) or atomic_copy(source, path): name the file written
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0] if isinstance(args[1], bytes) else args[1]))

    write_folders(tmp_path / "raw", n=3)
    monkeypatch.setattr(mmdata.build.finish, "atomic_write", full)
    monkeypatch.setattr(mmdata.build.finish, "atomic_copy", full)
    assert main(["build", str(tmp_path / "raw"), str(tmp_path / "ds"), "--workers", "1", "-q"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines() == [f"mmdata build: error: No space left on device: {tmp_path / 'ds' / 'rejects.jsonl'}"]


def test_a_reader_that_goes_away_is_no_error(built, monkeypatch, capsys):
    def piped(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr(mmdata.info, "run", piped)
    assert main(["info", str(built)]) == 141  # as a shell reports a SIGPIPE, and without a word
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("argv", [["mmdata", "--help"], ["mtml_models", "--help"], ["mtml_models", "train", "--help"],
                                  ["mtml_models", "eval", "--help"]])
def test_help_answers_without_importing_torch(argv):
    module, *args = argv
    code = (f"import contextlib, io, sys\nfrom {module}.cli import main\n"
            f"with contextlib.redirect_stdout(io.StringIO()) as out:\n    rc = main({args!r})\n"
            "print(rc, 'usage:' in out.getvalue(), sorted(m for m in ('torch', 'transformers') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.stdout.split("\n")[0] == "0 True []", done.stderr
