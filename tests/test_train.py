"""`mtml train` / `mtml eval` end to end on a dataset built from sample_data."""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmdata.build import build_dataset
from mtml_models.cli import main as mtml
from mtml_models.config import TrainConfig
from mtml_models.evaluate import drop, evaluate_run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--set", "optim.epochs=2", "--set", "data.batch_size=16", "--set", "data.num_workers=0",
        "--set", "model.image.width=8", "--set", "model.audio.width=8", "--set", "model.embed_dim=32",
        "--set", "model.trunk_width=32", "--no-progress"]


@pytest.fixture(scope="module")
def avdata(tmp_path_factory) -> Path:
    """sample_data with george as test and a val speaker: 100 train, 50 val, 50 test."""
    out = tmp_path_factory.mktemp("data") / "avmnist"
    from mmdata.build import BuildConfig

    cfg = BuildConfig.from_dict({"split_by": "speaker", "test_groups": ["george"], "val": 0.15})
    build_dataset(ROOT / "sample_data", out, cfg, progress=False)
    return out


def _train(data: Path, out: Path, *extra: str) -> None:
    args = ["train", "--data", str(data), "--config", str(ROOT / "configs/avmnist.yaml"), "--out", str(out)]
    assert mtml([*args, *FAST, *extra]) == 0


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_train_then_eval_reports_every_task(avdata, tmp_path, capsys, caplog):
    run = tmp_path / "run"
    caplog.set_level(logging.INFO, logger="mtml_models")
    capsys.readouterr()
    _train(avdata, run)
    best_epoch = json.loads(capsys.readouterr().out)["best_epoch"]
    rows = _rows(run)
    # one count of epochs, from 1, wherever a user reads it: the log, metrics.csv, best, eval
    assert [r["epoch"] for r in rows] == ["1", "2"]
    logged = [int(m.split()[1].rstrip(":")) for m in caplog.messages if m.startswith("epoch ")]
    assert logged == [1, 2]
    assert str(best_epoch) in {r["epoch"] for r in rows}
    assert {"train_digit", "train_parity", "val_digit_accuracy", "val_parity_macro_f1"} <= set(rows[0])
    with Image.open(run / "curves.png") as im:
        assert im.size[0] > 0
    assert (run / "best" / "model.safetensors").is_file() and (run / "last" / "optimizer.safetensors").is_file()
    saved = TrainConfig.from_dict(json.loads((run / "config.json").read_text()))  # the resolved config reads back
    assert saved.optim.epochs == 2 and saved.model.image.width == 8 and saved.model.audio.n_mels == 13
    capsys.readouterr()
    assert mtml(["eval", "--run", str(run), "--split", "test", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["samples"] == 50 and set(result["tasks"]) == {"digit", "parity"}
    assert 0 <= result["tasks"]["digit"]["accuracy"] <= 1
    assert result["epoch"] == best_epoch
    assert mtml(["eval", "--run", str(run), "--split", "test"]) == 0
    assert f"epoch {best_epoch}" in capsys.readouterr().out


def test_resumed_run_continues_the_same_curve(avdata, tmp_path):
    whole, halves = tmp_path / "whole", tmp_path / "halves"
    one_worker = ("--set", "data.num_workers=1")  # a persistent worker process, reseeded per epoch
    _train(avdata, whole, *one_worker)
    _train(avdata, halves, *one_worker, "--stop-after", "1")
    assert len(_rows(halves)) == 1
    assert mtml(["train", "--data", str(avdata), "--out", str(halves), "--resume", "--no-progress"]) == 0
    a, b = _rows(whole), _rows(halves)
    for key in ("train_loss", "val_digit_accuracy", "val_parity_accuracy"):
        assert [float(r[key]) for r in a] == pytest.approx([float(r[key]) for r in b], rel=1e-4), key


def test_without_a_val_split_the_schedule_is_fixed(tmp_path):
    from mmdata.build import BuildConfig

    data = tmp_path / "noval"
    build_dataset(ROOT / "sample_data", data,
                  BuildConfig.from_dict({"split_by": "speaker", "test_groups": ["george"]}), progress=False)
    run = tmp_path / "run"
    _train(data, run)
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["epoch"] == 2  # the last of the two epochs: nothing to select on


def test_dropping_a_modality_clears_mask_and_input(avdata, tmp_path):
    from mmdata import make_loader, open_dataset

    batch = next(iter(make_loader(open_dataset(avdata), "test", batch_size=4, shuffle=False,
                                  modalities=["image", "audio"])))
    dropped = drop(batch, "audio")
    assert not dropped.audio_mask.any() and not dropped.audio.any()
    assert torch.equal(dropped.image, batch.image) and dropped.image_mask.all()
    run = tmp_path / "run"
    _train(avdata, run)
    full = evaluate_run(run, str(avdata), "test")
    no_audio = evaluate_run(run, str(avdata), "test", drop_modality="audio")
    assert no_audio["dropped"] == "audio" and set(no_audio["tasks"]) == set(full["tasks"])


def test_two_process_ddp_matches_one_process(avdata, tmp_path):
    """torchrun --nproc-per-node 2 on the CPU (gloo), same global batch as one process."""
    one, two = tmp_path / "one", tmp_path / "two"
    _train(avdata, one, "--set", "data.batch_size=16")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "mtml_models", "train", "--data", str(avdata), "--config", str(ROOT / "configs/avmnist.yaml"),
           "--out", str(two), *FAST, "--set", "data.batch_size=8"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=240)
    finally:  # a hung rendezvous must not leave ranks behind
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, stderr[-3000:]
    a, b = _rows(one), _rows(two)
    assert len(a) == len(b) == 2
    # Same data, global batch and initialisation; the two runs differ only in sample order.
    assert float(b[-1]["train_loss"]) == pytest.approx(float(a[-1]["train_loss"]), rel=0.1)
    assert float(b[-1]["val_digit_accuracy"]) == pytest.approx(float(a[-1]["val_digit_accuracy"]), abs=0.2)


def test_aux_losses_train_each_modality_alone_where_present():
    from mmdata.batch import Batch
    from mmdata.tasks import Task, TaskList
    from mtml_models.losses import add_aux_losses

    tasks = TaskList((Task("digit", "classification", ("0", "1")),))
    batch = Batch(keys=["a", "b"], image_mask=torch.tensor([True, True]), audio_mask=torch.tensor([True, False]),
                  labels={"digit": torch.tensor([0, 1])}, label_mask={"digit": torch.tensor([True, True])})
    good, bad = torch.tensor([[9.0, -9.0]]), torch.tensor([[-9.0, 9.0]])
    parts = {"image": {"digit": torch.cat([good, bad])},  # right on both samples (labels 0, 1)
             "audio": {"digit": torch.cat([good, good])}}  # wrong on b, which has no audio
    losses = {"digit": torch.tensor(1.0)}
    add_aux_losses(losses, parts, batch, tasks, {}, weight=0.5)
    assert losses["digit"].item() == pytest.approx(1.0, abs=1e-3)  # both parts right where present
    parts["audio"]["digit"] = torch.cat([bad, good])  # now wrong on a, which has audio
    losses = {"digit": torch.tensor(1.0)}
    add_aux_losses(losses, parts, batch, tasks, {}, weight=0.5)
    assert losses["digit"].item() == pytest.approx(1.0 + 0.5 * 18, abs=1e-3)
