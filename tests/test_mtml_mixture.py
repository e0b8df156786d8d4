"""`mtml train --data A --data B` and `mtml eval` on data that shares only part of the model's tasks and modalities.

Tiny datasets built from the conftest media of sample ``i`` (split ``val`` when i % 4 == 3, else ``train``):
``images`` has the image, ``digit`` = i % 3 (classes 0-2) and ``parity``; ``speech`` has the audio,
``digit`` = i % 3 + 1 (classes 1-3: united, speech's class c is stored as index c - 1 of its own list)
and ``speaker``; ``paired`` has both media and every label of ``images``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from conftest import SPEAKERS, audio_bytes, image_bytes

from mmdata.build import build_dataset
from mmdata.errors import ConfigError
from mmdata.tasks import Task, TaskList
from mtml_models.cli import main as mtml
from mtml_models.fusion import LateFusion
from mtml_models.model import ModelConfig, MultiTaskModel
from mtml_models.sources import parse_data

ROOT = Path(__file__).resolve().parents[1]
N = 32
FAST = ["--set", "optim.epochs=2", "--set", "data.batch_size=8", "--set", "data.num_workers=0",
        "--set", "model.image.width=8", "--set", "model.audio.width=8", "--set", "model.embed_dim=32",
        "--set", "model.trunk_width=32", "--no-progress", "-q"]


def write_source(root: Path, image: bool, audio: bool, labels) -> Path:
    for i in range(N):
        d = root / ("val" if i % 4 == 3 else "train") / f"s{i:03d}"
        d.mkdir(parents=True)
        if image:
            (d / "image.png").write_bytes(image_bytes(i))
        if audio:
            (d / "audio.wav").write_bytes(audio_bytes(i))
        (d / "labels.json").write_text(json.dumps(labels(i)))
    return root


def image_labels(i: int) -> dict:
    return {"digit": i % 3, "parity": "even" if i % 2 == 0 else "odd"}


def speech_labels(i: int) -> dict:
    return {"digit": i % 3 + 1, "speaker": SPEAKERS[i % 4]}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("mix")
    raw = {"images": write_source(tmp / "raw" / "images", True, False, image_labels),
           "speech": write_source(tmp / "raw" / "speech", False, True, speech_labels),
           "paired": write_source(tmp / "raw" / "paired", True, True, image_labels)}
    out = {}
    for name, source in raw.items():
        out[name] = tmp / name
        build_dataset(source, out[name], progress=False)
    return out


def _train_args(data: dict[str, Path], out: Path) -> list[str]:
    return ["train", "--data", str(data["images"]), "--data", str(data["speech"]), "--data-weights", "1", "2",
            "--config", str(ROOT / "configs/avmnist.yaml"), "--out", str(out), *FAST]


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "mix"
    assert mtml(_train_args(data, out)) == 0
    return out


def _rows(run: Path) -> list[dict[str, str]]:
    with open(run / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def _eval(capsys, run: Path, *args: str) -> dict:
    capsys.readouterr()
    assert mtml(["eval", "--run", str(run), "--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_train_on_a_mixture_validates_pooled_and_per_source(run, data):
    rows = _rows(run)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    columns = set(rows[0])
    assert {"val_digit_accuracy", "val_parity_accuracy", "images/val_digit_accuracy", "images/val_parity_accuracy",
            "speech/val_digit_accuracy"} <= columns
    # a source is scored only on the tasks it has; speaker is not a task of the recipe (data.tasks)
    assert not any(c.startswith("speech/val_parity") or "speaker" in c for c in columns)
    for r in rows:  # every val sample is labelled with digit: the pooled accuracy is the sources' mean (8 + 8)
        pooled = float(r["val_digit_accuracy"])
        assert pooled == pytest.approx((float(r["images/val_digit_accuracy"]) + float(r["speech/val_digit_accuracy"]))
                                       / 2, abs=1e-9)
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["data"]["weights"] == {"images": 1.0, "speech": 2.0}
    # the audio branch never sees parity labelled: it has no parity head, the image branch decides parity
    assert cfg["model"]["fusion"]["branch_tasks"] == {"image": ["digit", "parity"], "audio": ["digit"]}
    meta = json.loads((run / "best" / "meta.json").read_text())
    assert meta["data"] == {"images": str(data["images"]), "speech": str(data["speech"])}
    assert [t["name"] for t in meta["tasks"]] == ["digit", "parity"]
    assert meta["tasks"][0]["classes"] == ["0", "1", "2", "3"]  # united: images' order, speech's 3 appended


def test_eval_on_data_lacking_a_task_or_a_modality(run, data, capsys):
    speech = _eval(capsys, str(run), "--data", str(data["speech"]), "--split", "val")
    assert set(speech["tasks"]) == {"digit"} and speech["absent_tasks"] == ["parity"]
    assert speech["absent_modalities"] == ["image"] and speech["samples"] == N // 4
    assert 0 <= speech["tasks"]["digit"]["accuracy"] <= 1
    images = _eval(capsys, str(run), "--data", str(data["images"]), "--split", "val")
    assert set(images["tasks"]) == {"digit", "parity"} and images["absent_tasks"] == []
    assert images["absent_modalities"] == ["audio"]
    # a modality the data lacks is a dropped one: the same samples with their audio dropped score the same
    dropped = _eval(capsys, str(run), "--data", str(data["paired"]), "--split", "val", "--drop-modality", "audio")
    assert dropped["tasks"] == images["tasks"] and dropped["absent_modalities"] == []
    # no speech source was labelled with parity: without images no branch predicts it, so it is not scored
    no_image = _eval(capsys, str(run), "--data", str(data["paired"]), "--split", "val", "--drop-modality", "image")
    assert set(no_image["tasks"]) == {"digit"} and no_image["unpredicted_tasks"] == ["parity"]
    assert images["unpredicted_tasks"] == [] and dropped["unpredicted_tasks"] == []
    capsys.readouterr()
    assert mtml(["eval", "--run", str(run), "--data", str(data["speech"]), "--split", "val"]) == 0
    text = capsys.readouterr().out
    assert "image dropped" in text and "parity       absent from the data" in text


def test_eval_on_the_mixture_reports_each_source(run, capsys):
    result = _eval(capsys, str(run), "--split", "val")  # the data the run trained on: both sources
    assert result["samples"] == 2 * (N // 4)
    assert set(result["sources"]) == {"images", "speech"}
    assert set(result["sources"]["images"]) == {"digit", "parity"} and set(result["sources"]["speech"]) == {"digit"}
    assert result["tasks"]["parity"] == result["sources"]["images"]["parity"]  # only images has parity


def test_a_resumed_mixture_run_continues_the_same_curve(run, data, tmp_path):
    halves = tmp_path / "halves"
    assert mtml([*_train_args(data, halves), "--stop-after", "1"]) == 0
    assert mtml(["train", "--data", str(data["images"]), "--data", str(data["speech"]), "--out", str(halves),
                 "--resume", "--no-progress", "-q"]) == 0  # weights and branches come back with the config
    a, b = _rows(run), _rows(halves)
    for key in ("train_loss", "val_digit_accuracy", "images/val_parity_accuracy", "speech/val_digit_accuracy"):
        assert [float(r[key]) for r in a] == pytest.approx([float(r[key]) for r in b], rel=1e-4), key


def test_weights_must_match_the_data(data, tmp_path, capsys):
    args = ["train", "--data", str(data["images"]), "--data", str(data["speech"]), "--config",
            str(ROOT / "configs/avmnist.yaml"), "--out", str(tmp_path / "run"), *FAST]
    assert mtml([*args, "--data-weights", "1"]) == 2
    assert "one per --data" in capsys.readouterr().err
    assert mtml([*args, "--set", "data.weights={images: 1, speach: 1}"]) == 2
    assert "did you mean 'speech'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_data_names():
    assert parse_data(["runs/a/images/"]) == "runs/a/images/"
    assert parse_data(["runs/images", "s3://bucket/speech"]) == {"images": "runs/images", "speech": "s3://bucket/speech"}
    assert parse_data(["img=runs/x", "runs/y"]) == {"img": "runs/x", "y": "runs/y"}
    with pytest.raises(ConfigError, match="NAME=PATH"):
        parse_data(["a/data", "b/data"])


DIGIT = Task("digit", "classification", ("0", "1", "2"))
PARITY = Task("parity", "classification", ("even", "odd"))


def test_a_branch_decides_only_the_tasks_it_has():
    fuse = LateFusion(("image", "audio"), ["digit", "parity"], weights={"audio": 0.5},
                      branch_tasks={"audio": ("digit",)})
    image = {"digit": torch.tensor([[3.0, 0.0, 0.0]] * 2), "parity": torch.tensor([[1.0, -1.0]] * 2)}
    audio = {"digit": torch.tensor([[0.0, 3.0, 0.0]] * 2)}  # no parity head
    both = {"image": torch.tensor([True, False]), "audio": torch.tensor([True, True])}
    out = fuse({"image": image, "audio": audio}, both)
    assert torch.equal(out["digit"][0], torch.tensor([2.0, 1.0, 0.0]))  # (3, 0, 0) * 2/3 + (0, 3, 0) * 1/3
    assert torch.equal(out["digit"][1], audio["digit"][1])
    assert torch.equal(out["parity"][0], image["parity"][0])  # the audio branch has no say on parity
    assert torch.equal(out["parity"][1], torch.zeros(2))  # no branch that predicts parity is present
    with pytest.raises(ConfigError, match="to no modality"):
        LateFusion(("image", "audio"), ["digit", "parity"], branch_tasks={"image": ("digit",), "audio": ("digit",)})


def test_every_parameter_of_a_model_with_branch_tasks_learns():
    from mmdata.batch import Batch

    cfg = ModelConfig.from_dict({"modalities": ["image", "text"], "embed_dim": 16, "trunk_width": 16,
                                 "image": {"kind": "cnn", "width": 4, "depth": 1},
                                 "text": {"kind": "bag", "vocab_size": 20},
                                 "fusion": {"name": "late", "late_weights": "learned",
                                            "branch_tasks": {"text": ["digit"]}}})
    model = MultiTaskModel(TaskList((DIGIT, PARITY)), cfg)
    assert "parity" not in model.heads["text"] and model.task_parameters("parity")
    g = torch.Generator().manual_seed(0)
    batch = Batch(keys=list("abcd"), image=torch.randn(4, 3, 8, 8, generator=g),
                  image_mask=torch.tensor([True, True, False, True]),
                  text_ids=torch.randint(1, 20, (4, 5), generator=g), attention_mask=torch.ones(4, 5, dtype=torch.long),
                  text_mask=torch.tensor([True, False, True, True]))
    out = model(batch)
    (out["digit"].square().sum() + out["parity"].square().sum()).backward()
    assert [n for n, p in model.named_parameters() if n.startswith("fusion.")] == ["fusion.task_logits.digit"]
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert bool((model.fusion.task_logits["digit"].grad != 0).all())  # a lone voter's logit would be cancelled


def test_the_data_s_classes_are_read_in_the_model_s_order():
    from mmdata.batch import Batch
    from mmdata.errors import SchemaError
    from mtml_models.evaluate import apply_relabel, match_tasks

    model = TaskList((DIGIT, PARITY, Task("tags", "multilabel", ("a", "b", "c"))))
    data = TaskList((Task("digit", "classification", ("2", "7", "0")), Task("tags", "multilabel", ("c", "x", "a")),
                     Task("speaker", "classification", ("ann",))))
    shared, absent, relabel = match_tasks(model, data, "the data")
    assert shared == ["digit", "tags"] and absent == ["parity"] and set(relabel) == {"digit", "tags"}
    batch = Batch(keys=list("abc"), labels={"digit": torch.tensor([0, 1, 2]),
                                            "tags": torch.tensor([[1.0, 1, 0], [0, 0, 1], [0, 1, 0]])},
                  label_mask={"digit": torch.tensor([True, True, False]), "tags": torch.ones(3, dtype=torch.bool)})
    out = apply_relabel(batch, relabel)
    # "7" is not a class of the model: that sample leaves digit's metrics; "x" is dropped from tags
    assert out.labels["digit"].tolist()[:1] == [2] and out.label_mask["digit"].tolist() == [True, False, False]
    assert out.labels["tags"].tolist() == [[0, 0, 1], [1, 0, 0], [0, 0, 0]]
    with pytest.raises(SchemaError, match="'parity' is classification in the model but regression"):
        match_tasks(model, TaskList((Task("parity", "regression"),)), "the data")
