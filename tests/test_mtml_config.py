"""TrainConfig: one typed tree, unknown keys named with their file and nearest key, shared values derived."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from mmdata.errors import ConfigError
from mtml_models.cli import main as mtml
from mtml_models.config import DataConfig, TrainConfig, load_config
from mtml_models.encoders.image import IMAGENET_MEAN, IMAGENET_STD

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "avmnist.yaml"


def test_an_unknown_set_key_exits_2_before_any_output_and_names_the_nearest(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--data", str(tmp_path / "no-data"), "--config", str(RECIPE), "--out", str(out)]
    assert mtml([*argv, "--set", "model.imag.kind=cnn"]) == 2
    err = capsys.readouterr().err
    assert "'model.imag.kind'" in err and "did you mean 'model.image.kind'?" in err and "--set" in err
    assert not out.exists()


def test_an_unknown_yaml_key_names_its_file_and_the_nearest_key(tmp_path):
    d = yaml.safe_load(RECIPE.read_text())
    d["optim"]["warmup_epoch"] = 2
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump(d))
    with pytest.raises(ConfigError, match=rf"'optim.warmup_epoch' in {path}; did you mean 'optim.warmup_epochs'"):
        load_config(path)
    d = {"model": {"audio": {"kind": "cnn", "widht": 8}}}
    with pytest.raises(ConfigError, match="'model.audio.widht' in x; did you mean 'model.audio.width'"):
        TrainConfig.from_dict(d, source="x")
    with pytest.raises(ConfigError, match=r"'augment.imag' .*'augment.image'"):
        TrainConfig.from_dict({"augment": {"imag": {}}})


def test_the_recipe_reads_back_from_its_saved_form():
    cfg = load_config(RECIPE)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    assert cfg.model.audio.n_mels == 13 and cfg.augment.image.size == cfg.data.image_size == (28, 28)


def test_the_audio_bins_and_image_size_are_set_in_one_place():
    cfg = load_config(RECIPE, ["augment.audio.cepstra=0", "augment.audio.n_mels=40", "data.image_size=32"])
    assert cfg.model.audio.n_mels == 40 and cfg.augment.image.size == (32, 32)
    with pytest.raises(ConfigError, match="model.audio.n_mels is 40, but it follows augment.audio"):
        load_config(RECIPE, ["model.audio.n_mels=40"])
    with pytest.raises(ConfigError, match="augment.image.size .* follows data.image_size"):
        load_config(RECIPE, ["augment.image.size=[32, 32]"])
    assert load_config(RECIPE, ["model.audio.n_mels=13"]) == load_config(RECIPE)  # agreeing: as saved runs hold it
    with pytest.raises(ConfigError, match="differs from data.image_size"):  # a tree built in code is checked too
        TrainConfig(data=DataConfig(image_size=28))


def test_image_normalisation_follows_a_pretrained_backbone_unless_set():
    tv = load_config(None, ["model.image.kind=torchvision"])
    assert (tv.augment.image.mean, tv.augment.image.std) == (IMAGENET_MEAN, IMAGENET_STD)
    recipe = load_config(RECIPE, ["model.image.kind=torchvision"])
    assert recipe.augment.image.mean == (0.13, 0.13, 0.13)  # set in the file: kept
    with pytest.raises(ConfigError, match="vit_b_16 takes"):
        load_config(None, ["model.image.kind=torchvision", "model.image.arch=vit_b_16"])
    assert load_config(None, ["model.image.kind=torchvision", "model.image.arch=vit_b_16", "data.image_size=224"])


@pytest.mark.parametrize("item,needle", [
    ("optim.epochs=abc", "optim.epochs must be an integer, got 'abc'"),
    ("model.image.freeze=-1", "model.image.freeze must be true, false or a number"),
    ("model.image.freeze=true", "apply to kind 'torchvision'"),
    ("model.audio.kind=hf", "needs model.audio.path"),
    ("weighting.temperature=2", "weighting.temperature is an option of 'dwa', not of 'equal'"),
    ("model.fusion.name=sum", "model.fusion.name must be one of"),
    ("optim.epochs", "--set expects key=value"),
    ("optim.lr.x=1", "'optim.lr' is a value, not a section"),
])
def test_bad_values_name_the_key(item, needle):
    with pytest.raises(ConfigError, match=needle):
        load_config(RECIPE, [item])


def test_values_convert_where_yaml_is_loose():
    cfg = load_config(RECIPE, ["optim.lr=1e-3", "model.modalities=image", "weighting=dwa", "model.fusion.heads=2",
                               "weighting.temperature=3", "data.tasks=digit"])
    assert cfg.optim.lr == 0.001 and cfg.model.modalities == ("image",) and cfg.data.tasks == ("digit",)
    assert cfg.weighting.name == "dwa" and cfg.weighting.options() == {"temperature": 3}
    assert cfg.model.fusion.name == "late" and cfg.model.fusion.heads == 2  # `fusion: {name: late}` kept


def test_an_hf_audio_encoder_refuses_mixup():
    with pytest.raises(ConfigError, match="hf audio encoder reads the waveform"):
        load_config(None, ["model.audio.kind=hf", "model.audio.path=x", "augment.mix.mixup_alpha=0.2"])
