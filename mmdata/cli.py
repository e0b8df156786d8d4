"""The `mmdata` command line: each subcommand lives in the module that does the work.

Exit status, the same for `mmdata` and `mtml`: 0 success; 1 the data failed a check (or the system refused:
a full disk, a locked output); 2 a usage or config error; 3 an unexpected internal error, printed as one
line (the traceback with ``-v``); 130 interrupted; 141 the reader of stdout went away (``| head``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import traceback

from .errors import MmdataError

# subcommand -> (where its add_arguments(parser) and run(args) -> int live, help): a module, or
# "module:name" for an object in it. Only the module of the subcommand being run is imported, so
# `mmdata --help` stays light (no torch).
COMMANDS = {
    "build": ("mmdata.build.command", "turn raw folders, manifests or tars into a sharded dataset"),
    "info": ("mmdata.info", "summarise a dataset from its card and index"),
    "verify": ("mmdata.verify", "check shards against the card: hashes, counts, structure, decoding"),
    "show": ("mmdata.show", "draw a contact sheet of samples (or print the rejects)"),
    "stats": ("mmdata.stats", "plot label distributions and media size histograms"),
}
LOGGERS = ("mmdata", "mtml_models")  # the packages whose log level -v and -q set
EXIT_OK, EXIT_DATA, EXIT_USAGE, EXIT_INTERNAL, EXIT_INTERRUPTED, EXIT_BROKEN_PIPE = 0, 1, 2, 3, 130, 141


def _common_options() -> argparse.ArgumentParser:
    """-v/-q, accepted before and after the subcommand (SUPPRESS: a subcommand never resets them)."""
    common = argparse.ArgumentParser(add_help=False)
    group = common.add_mutually_exclusive_group()
    group.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                       help="log debug messages; print the traceback of an internal error")
    group.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                       help="no progress bars and no summaries: only errors (and --json output)")
    return common


def make_parser(prog: str, description: str, commands: dict[str, tuple[str, str]],
                version: str, argv: list[str] | None = None) -> argparse.ArgumentParser:
    """A parser whose subcommands expose add_arguments(parser) and run(args); ``argv`` picks the one to import.

    Only the subcommand named in ``argv`` (sys.argv by default) gets its arguments, and only its module is
    imported: the others are listed by name and help text.
    """
    common = _common_options()
    parser = argparse.ArgumentParser(prog=prog, description=description, parents=[common],
                                     epilog="exit status: 0 ok, 1 the data failed a check, 2 usage or config "
                                            "error, 3 internal error")
    parser.add_argument("--version", action="version", version=f"{prog} {version}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(commands, sys.argv[1:] if argv is None else argv)
    for name, (target, help_text) in commands.items():
        if name != chosen:
            sub.add_parser(name, help=help_text, parents=[common])
            continue
        command = _load(target)
        p = sub.add_parser(name, help=help_text, parents=[common],
                           description=(command.__doc__ or help_text).strip().splitlines()[0])
        command.add_arguments(p)
        p.set_defaults(_run=command.run)
    return parser


def _chosen(commands: dict[str, tuple[str, str]], argv: list[str]) -> str | None:
    """The subcommand ``argv`` names: its first word that is not an option (the global ones take no value)."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in commands else None


def _load(target: str):
    """The module ``target`` names, or the object ``name`` in it for ``module:name``."""
    module, _, name = target.partition(":")
    mod = importlib.import_module(module)
    return getattr(mod, name) if name else mod


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, set up logging, run the subcommand; map every failure to one line and an exit status."""
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help and --version (0), usage errors (2): argparse has printed them
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    args.verbose = getattr(args, "verbose", False)
    args.quiet = getattr(args, "quiet", False)
    if not getattr(args, "_run", None):
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    where = f"{parser.prog} {args.command}"
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # other libraries: warnings only
    level = logging.DEBUG if args.verbose else logging.WARNING if args.quiet else logging.INFO
    ours = [logging.getLogger(name) for name in LOGGERS]
    before = [log.level for log in ours]
    for log in ours:
        log.setLevel(level)
    try:
        return int(args._run(args) or 0)
    except MmdataError as e:
        print(f"{where}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"{where}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `mmdata info DS | head`: the reader left; say nothing, as `cat` would
        return EXIT_BROKEN_PIPE
    except OSError as e:  # the system refused: a full disk, a read-only folder, a vanished file
        if args.verbose:
            traceback.print_exc()
        print(f"{where}: error: {_os_message(e)}", file=sys.stderr)
        return EXIT_DATA
    except Exception as e:  # noqa: BLE001 - a bug of ours: one line, the traceback only when asked
        if args.verbose:
            traceback.print_exc()
            print(f"{where}: internal error: {type(e).__name__}: {e}", file=sys.stderr)
        else:
            print(f"{where}: internal error: {type(e).__name__}: {e} (rerun with -v for the traceback)",
                  file=sys.stderr)
        return EXIT_INTERNAL
    finally:  # main() called from Python (tests, notebooks) leaves the loggers as it found them
        for log, lvl in zip(ours, before):
            log.setLevel(lvl)


def _os_message(e: OSError) -> str:
    """'No space left on device: /out/train-000000.tar' rather than '[Errno 28] ...'."""
    what = e.strerror or str(e) or type(e).__name__
    return f"{what}: {e.filename}" if e.filename else what


def add_storage_options(p: argparse.ArgumentParser, what: str = "a dataset URL") -> None:
    """``--storage-options JSON``: fsspec options (endpoint, credentials) for remote paths."""
    p.add_argument("--storage-options", metavar="JSON", type=_json_object, default=None,
                   help=f"fsspec options for {what}, e.g. "
                        '\'{"client_kwargs": {"endpoint_url": "http://minio:9000"}}\'')


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"--storage-options must be a JSON object, got {text!r}: {e}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"--storage-options must be a JSON object, got {text!r}")
    return value


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from . import __version__

    return make_parser(
        "mmdata", "Build, inspect and verify aligned multimodal datasets (image + audio + text, several tasks).",
        COMMANDS, __version__, argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
