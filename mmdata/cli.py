"""The `mmdata` command line: each subcommand lives in the module that does the work."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import MmdataError

# subcommand -> module exposing add_arguments(parser) and run(args) -> int exit status
COMMANDS = {
    "build": ("mmdata.build.command", "turn raw folders, manifests or tars into a sharded dataset"),
    "info": ("mmdata.info", "summarise a dataset from its card and index"),
    "verify": ("mmdata.verify", "check shards against the card: hashes, counts, structure, decoding"),
    "show": ("mmdata.show", "draw a contact sheet of samples (or print the rejects)"),
    "stats": ("mmdata.stats", "plot label distributions and media size histograms"),
}


def make_parser(prog: str, description: str, commands: dict[str, tuple[str, str]]) -> argparse.ArgumentParser:
    """A parser whose subcommands are modules exposing add_arguments(parser) and run(args)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in commands.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip().splitlines()[0])
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def run_cli(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Parse, set up logging, run the subcommand; an MmdataError becomes one line on stderr and exit 1."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except MmdataError as e:
        print(f"{parser.prog} {args.command}: error: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    return make_parser(
        "mmdata", "Build, inspect and verify aligned multimodal datasets (image + audio + text, several tasks).",
        COMMANDS)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
