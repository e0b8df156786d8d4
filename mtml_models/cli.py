"""The `mtml` command line: train and evaluate reference multi-task fusion models."""

from __future__ import annotations

import argparse
import sys

from mmdata.cli import make_parser, run_cli

COMMANDS = {
    "train": ("mtml_models.train", "train a model on a dataset's stream"),
    "eval": ("mtml_models.evaluate", "evaluate a trained run per task, optionally with a modality removed"),
}


def build_parser() -> argparse.ArgumentParser:
    from mmdata import __version__

    return make_parser("mtml", "Train and evaluate multi-task fusion models on mmdata datasets.", COMMANDS,
                       __version__)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
