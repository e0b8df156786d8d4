"""The `mtml` command line: train and evaluate reference multi-task fusion models."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mmdata.errors import MmdataError

COMMANDS = {
    "train": ("mtml_models.train", "train a model on a dataset's stream"),
    "eval": ("mtml_models.evaluate", "evaluate a trained run per task, optionally with a modality removed"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtml", description="Train and evaluate multi-task fusion models on mmdata datasets."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
            continue  # not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s")
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except MmdataError as e:
        print(f"mtml {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
