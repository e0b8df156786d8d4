"""Pretrained backbones from local files: torchvision state dicts, Hugging Face text and speech models.

Every model here is tiny, random and saved in tmp_path by the test itself: nothing is downloaded.
"""

from __future__ import annotations

import json
import shutil
from fractions import Fraction
from pathlib import Path

import pytest
import torch
import torchvision
from conftest import write_folders
from safetensors.torch import load_file, save_file

from mmdata.build import BuildConfig, build_dataset
from mmdata.errors import ConfigError
from mtml_models.config import TrainConfig
from mtml_models.encoders import AudioEncoderConfig, HFAudio, ImageEncoderConfig, TorchvisionImage
from mtml_models.evaluate import evaluate_run
from mtml_models.session import eval_loader, make_optimizer, make_task_weighting, open_session
from mtml_models.train import train

# the special tokens away from mmdata's own ids (0..4), so a test sees whose ids the loader used
VOCAB = ["[PAD]", *"abcdefghijklmnopqrstuvwxyz0123456789", "sample", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def hf(tmp_path_factory) -> dict[str, Path]:
    """A tiny BERT with its tokenizer (built from a vocab file) and a tiny wav2vec2 with its feature extractor."""
    from transformers import (
        BertConfig,
        BertModel,
        BertTokenizerFast,
        Wav2Vec2Config,
        Wav2Vec2FeatureExtractor,
        Wav2Vec2Model,
    )

    base = tmp_path_factory.mktemp("hf")
    (base / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    BertTokenizerFast(str(base / "vocab.txt")).save_pretrained(base / "bert")
    torch.manual_seed(0)
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                         vocab_size=len(VOCAB), max_position_embeddings=32)).save_pretrained(base / "bert")
    Wav2Vec2Model(Wav2Vec2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
                                 conv_dim=(8, 8), conv_kernel=(10, 3), conv_stride=(5, 2), num_conv_pos_embeddings=8,
                                 num_conv_pos_embedding_groups=2, vocab_size=8)).save_pretrained(base / "w2v")
    Wav2Vec2FeatureExtractor(sampling_rate=16000, do_normalize=True).save_pretrained(base / "w2v")
    return {"bert": base / "bert", "w2v": base / "w2v"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """12 samples with image, audio (8 kHz) and text: 9 train, 3 val."""
    base = tmp_path_factory.mktemp("ds")
    build_dataset(write_folders(base / "raw", n=12), base / "ds", BuildConfig(workers=1, val=0.25, tokenizer_vocab=40),
                  progress=False)
    return base / "ds"


def hf_config(hf: dict[str, Path], **model) -> TrainConfig:
    return TrainConfig.from_dict({
        "data": {"batch_size": 4, "tasks": ["digit", "parity"], "image_size": 16, "max_text_tokens": 8},
        "model": {"modalities": ["image", "audio", "text"], "embed_dim": 8, "trunk_width": 8,
                  "image": {"width": 4, "depth": 1}, "audio": {"kind": "hf", "path": str(hf["w2v"])},
                  "text": {"kind": "hf", "path": str(hf["bert"])}, **model},
        "optim": {"epochs": 1}})


def save_resnet18(path: Path) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    state = {k: v.clone() for k, v in torchvision.models.resnet18().state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return state


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_resnet18_state_dict_loads_into_kind_torchvision(tmp_path, suffix):
    saved = save_resnet18(tmp_path / f"r18{suffix}")
    enc = TorchvisionImage(8, ImageEncoderConfig(kind="torchvision", arch="resnet18", weights=str(tmp_path / f"r18{suffix}")))
    loaded = enc.backbone.state_dict()
    assert set(loaded) == {k for k in saved if not k.startswith("fc.")}  # the classifier gives way to proj
    assert all(torch.equal(loaded[k], saved[k]) for k in loaded)
    mask = torch.tensor([True, False])
    z, _ = enc.eval()(torch.randn(2, 3, 32, 32), mask)
    assert z.shape == (2, 8) and torch.equal(z[1], torch.zeros(8))


def test_weights_that_do_not_fit_name_the_first_key(tmp_path):
    save_resnet18(tmp_path / "r18.safetensors")
    with pytest.raises(ConfigError, match=r"model.image.weights.*'layer1.0.conv1.weight' has shape \(64, 64, 3, 3\)"):
        TorchvisionImage(8, ImageEncoderConfig(kind="torchvision", arch="resnet50", weights=str(tmp_path / "r18.safetensors")))
    state = load_file(str(tmp_path / "r18.safetensors"))
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "ddp.safetensors"))
    with pytest.raises(ConfigError, match="'conv1.weight' is missing.*extra prefix 'module.'"):
        TorchvisionImage(8, ImageEncoderConfig(kind="torchvision", weights=str(tmp_path / "ddp.safetensors")))
    with pytest.raises(ConfigError, match="does not exist"):
        TorchvisionImage(8, ImageEncoderConfig(kind="torchvision", weights=str(tmp_path / "none.pth")))
    torch.save({"fc.weight": torch.zeros(1), "note": Fraction(1, 2)}, tmp_path / "pickled.pth")
    with pytest.raises(ConfigError, match="weights_only=True"):  # refused, never unpickled
        TorchvisionImage(8, ImageEncoderConfig(kind="torchvision", weights=str(tmp_path / "pickled.pth")))


def test_freeze_trains_only_the_last_blocks_and_frozen_batchnorm_keeps_its_statistics(tmp_path):
    save_resnet18(tmp_path / "r18.pth")
    enc = TorchvisionImage(8, ImageEncoderConfig(kind="torchvision", weights=str(tmp_path / "r18.pth"), freeze=1))
    trainable = {n.split(".")[0] for n, p in enc.backbone.named_parameters() if p.requires_grad}
    assert trainable == {"layer4"} and all(p.requires_grad for p in enc.proj.parameters())
    enc.train()
    assert not enc.backbone.bn1.training and enc.backbone.layer4[0].bn1.training
    before = enc.backbone.layer1[0].bn1.running_mean.clone()
    enc(torch.randn(4, 3, 32, 32), torch.ones(4, dtype=torch.bool))
    assert torch.equal(enc.backbone.layer1[0].bn1.running_mean, before)
    assert not torch.equal(enc.backbone.layer4[0].bn1.running_mean, torch.zeros(512))
    frozen = TorchvisionImage(8, ImageEncoderConfig(kind="torchvision", freeze=True))
    assert not any(p.requires_grad for p in frozen.backbone.parameters())
    with pytest.raises(ConfigError, match="at most 4"):
        TorchvisionImage(8, ImageEncoderConfig(kind="torchvision", freeze=5))


def test_hf_text_and_audio_encoders_train_and_evaluate_offline(data, hf, tmp_path):
    run = tmp_path / "run"
    best = train(hf_config(hf), str(data), run, progress=False)
    assert best["epoch"] == 1 and set(best["metrics"]) == {"digit", "parity"}
    saved = json.loads((run / "config.json").read_text())
    tok = {"pad_id": 0, "unk_id": VOCAB.index("[UNK]"), "cls_id": VOCAB.index("[CLS]"), "sep_id": VOCAB.index("[SEP]"),
           "mask_id": VOCAB.index("[MASK]")}
    assert {k: saved["augment"]["text"][k] for k in tok} == tok  # text augmentation uses the tokenizer's ids
    assert saved["model"]["audio"]["sample_rate"] == 8000  # the card's rate, resampled to 16 kHz in the model
    result = evaluate_run(run, str(data), "val", drop_modality="text")
    assert result["samples"] == 3 and set(result["tasks"]) == {"digit", "parity"}


def test_the_loaded_weights_are_the_saved_ones(data, hf):
    session = open_session(hf_config(hf), str(data), torch.device("cpu"))
    for modality, folder in (("text", hf["bert"]), ("audio", hf["w2v"])):
        saved = load_file(str(folder / "model.safetensors"))
        loaded = session.model.encoders[modality].backbone.state_dict()
        assert loaded and all(torch.equal(v, saved[k]) for k, v in loaded.items()), modality


def test_the_loader_tokenises_with_the_hf_tokenizer(data, hf):
    from transformers import AutoTokenizer

    session = open_session(hf_config(hf), str(data), torch.device("cpu"))
    batch = next(iter(eval_loader(session, "train")))
    tok = AutoTokenizer.from_pretrained(str(hf["bert"]), local_files_only=True)
    for i, key in enumerate(batch.keys):
        if not batch.text_mask[i]:
            continue
        n = int(batch.attention_mask[i].sum())
        want = tok(f"sample {int(key[1:])}", truncation=True, max_length=8)["input_ids"]  # raw sample i's text
        assert batch.text_ids[i, :n].tolist() == want


def test_pretrained_parts_learn_at_a_lower_rate_and_frozen_parts_not_at_all(data, hf):
    cfg = hf_config(hf, text={"kind": "hf", "path": str(hf["bert"]), "freeze": 1})
    session = open_session(cfg, str(data), torch.device("cpu"))
    weighting, _ = make_task_weighting(session)
    opt, _ = make_optimizer(session, weighting, steps_per_epoch=2)
    head, backbone = opt.param_groups
    assert head["initial_lr"] == cfg.optim.lr  # before the schedule's warm-up factor
    assert backbone["initial_lr"] == pytest.approx(cfg.optim.lr * cfg.optim.backbone_lr_scale)
    pretrained = {id(p) for p in session.model.pretrained_parameters() if p.requires_grad}
    assert {id(p) for p in backbone["params"]} == pretrained
    bert = session.model.encoders["text"].backbone
    assert not any(p.requires_grad for p in bert.embeddings.parameters())
    assert all(p.requires_grad for p in bert.encoder.layer[0].parameters())
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in [*session.model.parameters(), *weighting.parameters()] if p.requires_grad}


def test_hf_audio_sees_what_its_feature_extractor_gives(hf):
    import torchaudio.functional
    from transformers import AutoFeatureExtractor

    enc = HFAudio(8, AudioEncoderConfig(kind="hf", path=str(hf["w2v"]), sample_rate=8000)).eval()
    g = torch.Generator().manual_seed(0)
    wave = torch.randn(2, 1200, generator=g)
    wave[1, 800:] = float("nan")  # padding: never read
    with torch.no_grad():
        z, _ = enc(wave, torch.tensor([1200, 800]), torch.tensor([True, True]))
        fe = AutoFeatureExtractor.from_pretrained(str(hf["w2v"]), local_files_only=True)
        clip = torchaudio.functional.resample(wave[:1], 8000, 16000)[0].numpy()  # the longest: no padding
        values = fe(clip, sampling_rate=16000, return_tensors="pt").input_values
        want = enc.proj(enc.backbone(input_values=values).last_hidden_state.mean(1))
    # This extractor gives no attention mask (a group-norm wav2vec2): a shorter clip sees zeros after
    # its end, as in the extractor's own batches, and its NaN padding none.
    assert torch.isfinite(z).all() and torch.allclose(z[0], want[0], atol=1e-4)


def test_whisper_encoder_reads_its_own_log_mel(tmp_path):
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperModel

    cfg = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=24, decoder_ffn_dim=24, vocab_size=50, pad_token_id=0,
                        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, max_target_positions=16)
    WhisperModel(cfg).save_pretrained(tmp_path / "whisper")
    WhisperFeatureExtractor().save_pretrained(tmp_path / "whisper")
    enc = HFAudio(8, AudioEncoderConfig(kind="hf", path=str(tmp_path / "whisper"), sample_rate=16000)).eval()
    assert type(enc.backbone).__name__ == "WhisperEncoder"  # the decoder is not kept
    wave = torch.randn(1, 3200, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        z, _ = enc(wave, None, torch.tensor([True]))
        features = WhisperFeatureExtractor()(wave[0].numpy(), sampling_rate=16000, return_tensors="pt").input_features
        h = enc.backbone(input_features=features).last_hidden_state[:, :10]  # 3200 samples: 10 encoder frames
        want = enc.proj(h.mean(1))
    assert torch.allclose(z, want, atol=1e-4)


def test_hf_folders_that_do_not_fit_fail_before_any_output(data, hf, tmp_path):
    bad = tmp_path / "bert"
    shutil.copytree(hf["bert"], bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "intermediate_size": 40}))
    run = tmp_path / "run"
    with pytest.raises(ConfigError, match="'encoder.layer.0.intermediate.dense.weight' has another shape"):
        train(hf_config(hf, text={"kind": "hf", "path": str(bad)}), str(data), run, progress=False)
    with pytest.raises(ConfigError, match="model.audio.path: .* does not exist"):
        train(hf_config(hf, audio={"kind": "hf", "path": str(tmp_path / "nowhere")}), str(data), run, progress=False)
    (bad / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match="no tokenizer"):
        train(hf_config(hf, text={"kind": "hf", "path": str(bad)}), str(data), run, progress=False)
    assert not run.exists()


def test_every_trainable_parameter_of_the_hf_encoders_gets_a_gradient(data, hf):
    from mtml_models.losses import task_losses

    torch.manual_seed(0)
    session = open_session(hf_config(hf), str(data), torch.device("cpu"))
    batch = session.augment.train()(next(iter(eval_loader(session, "train"))), generator=torch.Generator().manual_seed(0))
    assert batch.audio.dim() == 2 and batch.audio_features is None  # the waveform went around the pipeline
    model = session.model.train()
    sum(task_losses(model(batch), batch, session.tasks, model.target_stats).values()).backward()
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert [n for n, p in trainable if p.grad is None or not p.grad.abs().sum() > 0] == []


def test_hf_encoders_run_under_bf16_autocast(data, hf):
    session = open_session(hf_config(hf), str(data), torch.device("cpu"))
    batch = session.augment.eval()(next(iter(eval_loader(session, "val"))))
    model = session.model.eval()
    with torch.no_grad():
        plain = model(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(batch)
    for task, out in plain.items():
        assert torch.isfinite(low[task].float()).all()
        assert torch.allclose(low[task].float(), out, atol=0.1)  # bf16 in the model only, not in its inputs
