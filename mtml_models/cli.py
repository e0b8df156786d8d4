"""The `mtml` command line: train and evaluate reference multi-task fusion models.

This module imports neither torch nor the model code until a command runs, so ``mtml --help`` and
``mtml train --help`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmdata.cli import make_parser, run_cli
from mmdata.errors import ConfigError

COMMANDS = {
    "train": ("mtml_models.cli:TrainCommand", "train a model on a dataset's stream, or on a mixture of datasets"),
    "eval": ("mtml_models.cli:EvalCommand", "evaluate a trained run per task, optionally with a modality removed"),
}

MIXTURE_HELP = (
    "Several --data train one model on their mixture (mmdata.Mixture): tasks are united by name (data.tasks "
    "picks among them) and modalities too; a task or modality a source lacks is masked in its samples, so its "
    "loss and that branch learn only from the sources that have it. Late fusion gives each modality's branch "
    "only the tasks some source labels it with (model.fusion.branch_tasks, saved in the run's config). "
    "Validation reads every source's val split once per epoch: metrics.csv has the pooled val_TASK_METRIC "
    "columns (they select the best epoch, as for one dataset) and SOURCE/val_TASK_METRIC per source (only the "
    "tasks that source has). Sources are named NAME=PATH, else after the path's last folder.")


class TrainCommand:
    """Train a multi-task fusion model end to end on a dataset's stream (one process, or DDP under torchrun)."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.epilog = MIXTURE_HELP
        p.add_argument("--data", required=True, action="append", metavar="[NAME=]PATH",
                       help="dataset folder or URL (the output of `mmdata build`); repeat it to train on a mixture")
        p.add_argument("--data-weights", type=float, nargs="+", metavar="W",
                       help="a mixture's shares of a training epoch, one per --data in order (default: in "
                       "proportion to their train splits; 0 leaves a source out); sets data.weights")
        p.add_argument("--config", help="train YAML (data, model, augment, optim, weighting, select, seed); "
                       "with --resume, defaults to the config of RUN/last")
        p.add_argument("--out", required=True, help="run folder: checkpoints, metrics.csv, curves.png")
        p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set optim.epochs=5 --set model.fusion.name=late")
        p.add_argument("--resume", action="store_true", help="continue from RUN/last after the last finished epoch")
        p.add_argument("--device", help="torch device (default: this rank's CUDA device, else cpu)")
        p.add_argument("--stop-after", type=int, metavar="N",
                       help="stop after N epochs of this invocation; continue later with --resume")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        import torch.distributed as dist

        from .config import TrainConfig, apply_overrides, load_config
        from .sources import parse_data
        from .train import train

        data = parse_data(args.data)
        overrides = list(args.set)
        if args.data_weights is not None:
            if isinstance(data, str) or len(args.data_weights) != len(data):
                raise ConfigError(f"--data-weights gives {len(args.data_weights)} weights for "
                                  f"{1 if isinstance(data, str) else len(data)} --data; give one per --data of a "
                                  "mixture (two or more)")
            overrides.append("data.weights=" + json.dumps(dict(zip(data, args.data_weights))))
        if args.resume and not args.config:
            # the config of the last checkpoint: it holds the overrides of earlier resumed invocations too
            from .checkpoint import read_meta

            last = Path(args.out) / "last"
            saved = read_meta(last)["config"]
            cfg = TrainConfig.from_dict(apply_overrides(saved, overrides), source=f"{last}/meta.json")
        else:
            cfg = load_config(args.config, overrides)  # every key checked before anything is written
        best = train(cfg, data, args.out, resume=args.resume, device=args.device,
                     progress=not (args.no_progress or args.quiet), stop_after=args.stop_after)
        if not args.quiet and (not dist.is_initialized() or dist.get_rank() == 0):
            print(json.dumps({"best_epoch": best["epoch"], "metrics": best["metrics"]}, indent=2))
        if dist.is_initialized():
            dist.destroy_process_group()
        return 0


class EvalCommand:
    """Evaluate a trained run per task on a split, optionally with a modality removed."""

    @staticmethod
    def add_arguments(p: argparse.ArgumentParser) -> None:
        p.add_argument("--run", required=True, help="run folder written by `mtml train --out`")
        p.add_argument("--data", action="append", metavar="[NAME=]PATH",
                       help="dataset folder or URL (default: what the run trained on). Any dataset that shares "
                       "a task with the model: tasks it lacks are reported absent, a modality it lacks is "
                       "dropped. Repeat it to evaluate on several at once, with metrics per source too")
        p.add_argument("--split", default="test", help="split to evaluate (default: test)")
        p.add_argument("--drop-modality", choices=["image", "audio", "text"],
                       help="force this modality absent in every sample")
        p.add_argument("--checkpoint", default="best", choices=["best", "last"],
                       help="which checkpoint (default best)")
        p.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
        p.add_argument("--json", action="store_true", help="print the result as JSON")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        from .checkpoint import read_meta
        from .evaluate import evaluate_run
        from .sources import parse_data

        data = parse_data(args.data) if args.data else read_meta(Path(args.run) / args.checkpoint)["data"]
        result = evaluate_run(args.run, data, args.split, drop_modality=args.drop_modality,
                              checkpoint=args.checkpoint, device=args.device)
        if args.json:
            print(json.dumps(result, indent=2))
            return 0
        dropped = list(dict.fromkeys(m for m in [args.drop_modality, *result["absent_modalities"]] if m))
        dropped_text = f", {' and '.join(dropped)} dropped" if dropped else ""
        print(f"{args.run} on {result['split']} ({result['samples']} samples, epoch {result['epoch']}{dropped_text})")
        _print_tasks(result["tasks"], result["absent_tasks"], "  ")
        for task in result["unpredicted_tasks"]:
            print(f"  {task:12s} not predicted: no modality left has a head for it")
        for source, tasks in result.get("sources", {}).items():
            print(f"  {source}:")
            _print_tasks(tasks, [], "    ")
        return 0


def _print_tasks(tasks: dict[str, dict[str, float]], absent: list[str], indent: str) -> None:
    for task, ms in tasks.items():
        print(f"{indent}{task:12s} " + "  ".join(f"{k} {v:.4f}" for k, v in ms.items()))
    for task in absent:
        print(f"{indent}{task:12s} absent from the data")


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    from mmdata import __version__

    return make_parser("mtml", "Train and evaluate multi-task fusion models on mmdata datasets.", COMMANDS,
                       __version__, argv)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(argv), argv)


if __name__ == "__main__":
    sys.exit(main())
