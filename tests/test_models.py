"""Encoders, fusion zoo, trunk and heads, masked losses: mask-awareness, gradients, config."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mmdata.batch import Batch
from mmdata.errors import ConfigError
from mmdata.tasks import Task, TaskList
from mtml_models.fusion import FUSIONS
from mtml_models.losses import task_losses
from mtml_models.model import ModelConfig, MultiTaskModel

MODS = ("image", "audio", "text")
B, N_MELS, FRAMES, VOCAB, L = 8, 8, 20, 40, 7
TASKS = TaskList((
    Task("digit", "classification", tuple("0123456789")),
    Task("parity", "classification", ("even", "odd")),
    Task("size", "regression", dims=2),
    Task("tags", "multilabel", ("a", "b", "c")),
))


def make_cfg(fusion: str | dict = "concat", text: str = "bag", modalities=MODS, **kw) -> ModelConfig:
    """A tiny config; ``fusion`` is a name or a fusion section."""
    fusion = {"name": fusion} if isinstance(fusion, str) else fusion
    d = {"modalities": list(modalities), "embed_dim": 16, "trunk_width": 16, "dropout": 0.0,
         "image": {"width": 4, "depth": 2}, "audio": {"n_mels": N_MELS, "width": 4, "depth": 2},
         "text": {"kind": text, "vocab_size": VOCAB, "hidden": 16, "heads": 2, "max_length": 16},
         "fusion": {"heads": 2, "rank": 3, **fusion}}
    d.update(kw)
    return ModelConfig.from_dict(d)


def make_batch(present: dict[str, list[bool]] | None = None, seed: int = 0, n: int = B) -> Batch:
    """A batch whose sample i has distinct content; ``present[m][i]`` sets the presence masks."""
    g = torch.Generator().manual_seed(seed)
    present = present or {m: [True] * n for m in MODS}
    mask = {m: torch.tensor(present[m], dtype=torch.bool) for m in MODS}
    lengths = torch.tensor([FRAMES - 3 * (i % 4) for i in range(n)])
    attn = (torch.arange(L)[None, :] < torch.tensor([L - (i % 3) for i in range(n)])[:, None]).long()
    return Batch(
        keys=[f"s{i}" for i in range(n)],
        image=torch.randn(n, 3, 16, 16, generator=g) + torch.arange(n).view(-1, 1, 1, 1),
        image_mask=mask["image"],
        audio_features=torch.randn(n, N_MELS, FRAMES, generator=g), audio_feature_lengths=lengths,
        audio_mask=mask["audio"],
        text_ids=torch.randint(5, VOCAB, (n, L), generator=g) * attn, attention_mask=attn, text_mask=mask["text"],
        labels={"digit": torch.arange(n) % 10, "parity": torch.arange(n) % 2,
                "size": torch.randn(n, 2, generator=g), "tags": (torch.rand(n, 3, generator=g) > 0.5).float()},
        label_mask={t: torch.ones(n, dtype=torch.bool) for t in TASKS.names},
    )


def poison_absent(batch: Batch) -> Batch:
    """Same batch with NaN / out-of-range garbage in every absent modality row and padded audio frame."""
    image, audio, ids = batch.image.clone(), batch.audio_features.clone(), batch.text_ids.clone()
    image[~batch.image_mask] = float("nan")
    audio[~batch.audio_mask] = float("nan")
    padded = torch.arange(FRAMES)[None, :] >= batch.audio_feature_lengths[:, None]  # (B, F)
    audio.masked_fill_(padded[:, None, :], float("inf"))
    ids[~batch.text_mask] = 10**6
    return dataclasses.replace(batch, image=image, audio_features=audio, text_ids=ids)


PATTERNS = {
    "none": {m: [False] * B for m in MODS},
    "all": {m: [True] * B for m in MODS},
    **{f"only_{m}": {k: [k == m] * B for k in MODS} for m in MODS},
    # sample i has modality k iff bit k of i is set: every subset of the three, from none to all
    "mixed": {m: [bool(i >> k & 1) for i in range(B)] for k, m in enumerate(MODS)},
}


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_ignores_absent_content_and_stays_finite(fusion):
    torch.manual_seed(0)
    model = MultiTaskModel(TASKS, make_cfg(fusion)).eval()
    for name, pattern in PATTERNS.items():
        batch = make_batch({m: [bool(v) for v in pattern[m]] for m in MODS})
        with torch.no_grad():
            clean, poisoned = model(batch), model(poison_absent(batch))
        for task, out in clean.items():
            assert out.shape == (B, TASKS[task].num_outputs)
            assert torch.isfinite(out).all(), (fusion, name, task)
            assert torch.equal(out, poisoned[task]), (fusion, name, task)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_absent_modality_changes_output_only_through_the_mask(fusion):
    """Present content matters; a sample's output does not depend on other samples' modalities."""
    torch.manual_seed(0)
    model = MultiTaskModel(TASKS, make_cfg(fusion)).eval()
    full = make_batch()
    drop = make_batch({"image": [True] * B, "audio": [False] * B, "text": [True] * B})
    with torch.no_grad():
        a, b = model(full)["digit"], model(drop)["digit"]
        other = model(make_batch(seed=1))["digit"]
    assert not torch.allclose(a, b)  # removing audio changes predictions
    assert not torch.allclose(a, other)  # inputs matter
    # Sample 0 alone in a batch of one gives its row of the batched output.
    one = dataclasses.replace(full._map(lambda t: t[:1]), keys=full.keys[:1])
    with torch.no_grad():
        assert torch.allclose(model(one)["digit"][0], a[0], atol=1e-5)


def test_unloaded_modality_equals_absent_everywhere():
    torch.manual_seed(0)
    model = MultiTaskModel(TASKS, make_cfg("attention")).eval()
    absent = make_batch({"image": [True] * B, "audio": [True] * B, "text": [False] * B})
    unloaded = dataclasses.replace(absent, text_ids=None, attention_mask=None, text_mask=None)
    with torch.no_grad():
        for task, out in model(absent).items():
            assert torch.equal(out, model(unloaded)[task])
    with pytest.raises(ConfigError, match="none of the model's modalities"):
        model(Batch(keys=["a"]))


def test_batchnorm_image_encoder_ignores_absent_rows_in_training():
    torch.manual_seed(0)
    cfg = make_cfg("concat", image={"width": 4, "depth": 2, "norm": "batch"})
    model = MultiTaskModel(TASKS, cfg).train()
    batch = make_batch(PATTERNS["mixed"])
    assert torch.equal(model(batch)["digit"], model(poison_absent(batch))["digit"])


@pytest.mark.parametrize("fusion,text", [(f, "bert" if i % 2 else "bag") for i, f in enumerate(FUSIONS)]
                         + [("late_learned", "bag"), ("transformer", "bag"), ("concat", "bert")])
def test_every_parameter_gets_a_gradient(fusion, text):
    """Each parameter's gradient norm is a real fraction of the model's largest, not rounding noise.

    In float64 a gradient that is zero in exact arithmetic (a bias shared by every score of a softmax)
    comes out ~1e-17 of the largest; the smallest real ones here are ~1e-6 (BERT's query bias at init).
    The one exception is asserted to be such a zero: BERT's key bias adds q.b_k to every score of a query,
    which the softmax cancels (HF's BertModel has it; the "bert" text encoder is built from it).
    """
    torch.manual_seed(0)
    cfg = make_cfg({"name": "late", "late_weights": "learned"}, text) if fusion == "late_learned" \
        else make_cfg(fusion, text)
    model = MultiTaskModel(TASKS, cfg).double().train()
    batch = make_batch()._map(lambda t: t.double() if t.is_floating_point() else t)
    losses = task_losses(model(batch), batch, TASKS, model.target_stats)
    sum(losses.values()).backward()
    grads = dict(model.named_parameters())
    assert not [n for n, p in grads.items() if p.grad is None]
    assert all(torch.isfinite(p.grad).all() for p in grads.values())
    norms = {n: p.grad.norm().item() for n, p in grads.items()}
    top = max(norms.values())
    dead = {n for n in norms if n.startswith("encoders.text.bert.") and n.endswith(".attention.self.key.bias")}
    assert {n: norms[n] / top for n in dead if norms[n] > 1e-10 * top} == {}  # the softmax-cancelled ones
    assert {n: norms[n] / top for n in norms.keys() - dead if not norms[n] > 1e-10 * top} == {}


def test_task_with_every_label_masked_gives_zero_loss_and_zero_head_gradient():
    torch.manual_seed(0)
    model = MultiTaskModel(TASKS, make_cfg("gated"))
    batch = make_batch()
    batch.label_mask["parity"] = torch.zeros(B, dtype=torch.bool)
    batch.labels["parity"] = torch.full((B,), -100)  # garbage where unlabelled
    losses = task_losses(model(batch), batch, TASKS, model.target_stats)
    assert losses["parity"].item() == 0.0 and losses["parity"].requires_grad
    sum(losses.values()).backward()
    for p in model.task_parameters("parity"):
        assert torch.equal(p.grad, torch.zeros_like(p))
    assert all(p.grad.abs().sum() > 0 for p in model.task_parameters("digit"))


def test_losses_count_only_labelled_samples():
    logits = {"digit": torch.randn(4, 10, generator=torch.Generator().manual_seed(3)),
              "size": torch.tensor([[0.0, 1.0], [2.0, 2.0], [1.0, -1.0], [0.5, 0.5]]),
              "tags": torch.tensor([[2.0, -1.0, 0.0]] * 4)}
    mask = torch.tensor([True, False, True, False])
    batch = Batch(keys=list("abcd"),
                  labels={"digit": torch.tensor([3, -1, 7, 99]),
                          "size": torch.tensor([[2.0, 3.0], [float("nan")] * 2, [2.0, 1.0], [0.0, 0.0]]),
                          "tags": torch.tensor([[1.0, 0.0, 1.0], [float("nan")] * 3, [0.0, 1.0, 1.0], [1, 1, 1]])},
                  label_mask={"digit": mask, "size": mask, "tags": mask})
    stats = {"size": (torch.tensor([1.0, 1.0]), torch.tensor([1.0, 2.0]))}
    losses = task_losses(logits, batch, TASKS, stats)
    want = F.cross_entropy(logits["digit"][[0, 2]], torch.tensor([3, 7]))
    assert torch.allclose(losses["digit"], want)
    # standardised targets: [[1, 1], [1, 0]]; errors [[-1, 0], [0, -1]] -> mean of per-sample means 0.5
    assert torch.allclose(losses["size"], torch.tensor(0.5))
    l1 = task_losses(logits, batch, TASKS, stats, regression="l1")["size"]
    assert torch.allclose(l1, torch.tensor(0.5))
    want_bce = F.binary_cross_entropy_with_logits(logits["tags"][[0, 2]], batch.labels["tags"][[0, 2]])
    assert torch.allclose(losses["tags"], want_bce)


def test_soft_targets_match_the_cross_entropy_formula():
    logits = torch.tensor([[1.0, 2.0, 0.5], [0.0, 0.0, 3.0]])
    soft = torch.tensor([[0.7, 0.3, 0.0], [0.0, 0.5, 0.5]])
    task = Task("t", "classification", ("a", "b", "c"))
    batch = Batch(keys=["x", "y"], labels={"t": soft}, label_mask={"t": torch.tensor([True, True])})
    got = task_losses({"t": logits}, batch, [task])["t"]
    want = -(soft * logits.log_softmax(-1)).sum(-1).mean()
    assert torch.allclose(got, want)


def test_regression_target_stats_round_trip():
    model = MultiTaskModel(TASKS, make_cfg("concat"))
    model.set_target_stats("size", [10.0, -5.0], [2.0, 4.0])
    out = {"size": torch.tensor([[0.0, 1.0]]), "digit": torch.zeros(1, 10)}
    back = model.denormalize(out)
    assert torch.equal(back["size"], torch.tensor([[10.0, -1.0]]))
    assert back["digit"] is out["digit"]
    assert "target_scaler.stats.size.mean" in model.state_dict()
    with pytest.raises(ConfigError, match="regression"):
        model.set_target_stats("digit", 0.0, 1.0)
    with pytest.raises(ConfigError, match="std positive"):
        model.set_target_stats("size", 0.0, 0.0)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_bf16_autocast_forward_on_cpu(fusion):
    torch.manual_seed(0)
    model = MultiTaskModel(TASKS, make_cfg(fusion, "bert")).eval()
    batch = make_batch(PATTERNS["mixed"])
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(batch)
    assert all(torch.isfinite(o.float()).all() for o in out.values())


def test_audio_features_do_not_depend_on_padding():
    torch.manual_seed(0)
    enc = MultiTaskModel(TASKS, make_cfg("concat", modalities=("audio",))).encoders["audio"].eval()
    x = torch.randn(1, N_MELS, 11)
    padded = torch.cat([x, torch.randn(1, N_MELS, 9)], dim=2)  # same clip, 9 garbage frames after it
    mask = torch.ones(1, dtype=torch.bool)
    with torch.no_grad():
        a, _ = enc(x, torch.tensor([11]), mask)
        b, _ = enc(padded, torch.tensor([11]), mask)
        c, _ = enc(padded, torch.tensor([20]), mask)
    assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)
    with pytest.raises(ConfigError, match="n_mels"):
        enc(torch.randn(1, N_MELS + 1, 5), None, mask)


def test_shared_and_task_parameters_partition_the_model():
    for fusion in ("concat", "late"):
        model = MultiTaskModel(TASKS, make_cfg({"name": fusion, "late_weights": "learned"}))
        shared = {id(p) for p in model.shared_parameters()}
        specific = {id(p) for t in TASKS.names for p in model.task_parameters(t)}
        assert shared and specific and not shared & specific
        assert {id(p) for p in model.last_shared_parameters()} <= shared
        if fusion == "late":  # the learned late weights are per task: neither shared nor a head's
            specific |= {id(p) for p in model.fusion.parameters()}
        assert shared | specific == {id(p) for p in model.parameters()}


def test_model_config_round_trip_and_errors():
    cfg = make_cfg("tensor", "bert")
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert ModelConfig.from_dict({"fusion": "gated"}).fusion.name == "gated"
    bad = [({"fusion": {"nmae": "concat"}}, "nmae"), ({"colour": 1}, "colour"), ({"fusion": "sum"}, "sum"),
           ({"modalities": ["image", "smell"]}, "smell"), ({"dropout": 1.5}, "dropout"),
           ({"image": {"kind": "vit"}}, "vit")]
    for d, needle in bad:
        with pytest.raises(ConfigError, match=needle):
            MultiTaskModel(TASKS, ModelConfig.from_dict(d))
    with pytest.raises(ConfigError, match="vocab_size"):
        MultiTaskModel(TASKS, ModelConfig.from_dict({"modalities": ["text"]}))
    with pytest.raises(ConfigError, match="divisible"):
        MultiTaskModel(TASKS, make_cfg({"name": "transformer", "heads": 3}))


def test_no_hard_coded_device_in_the_package():
    root = Path(__file__).resolve().parents[1] / "mtml_models"
    for path in root.rglob("*.py"):
        assert "cuda:0" not in path.read_text(), path


@pytest.mark.gpu
@pytest.mark.parametrize("fusion", FUSIONS)
def test_forward_backward_on_cuda(fusion):
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = MultiTaskModel(TASKS, make_cfg(fusion, "bert")).to(device)
    batch = make_batch(PATTERNS["mixed"]).to(device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        losses = task_losses(model(batch), batch, TASKS, model.target_stats)
    sum(losses.values()).backward()
    assert all(torch.isfinite(v).all() for v in losses.values())
    assert all(p.grad is not None for p in model.parameters())



@pytest.mark.parametrize("fusion", FUSIONS)
def test_fusion_module_alone_ignores_nan_in_absent_features(fusion):
    """The fusion itself (not only the encoders before it) shields present samples from absent rows."""
    torch.manual_seed(0)
    model = MultiTaskModel(TASKS, make_cfg(fusion)).eval()
    masks = {m: torch.tensor(PATTERNS["mixed"][m]) for m in MODS}
    g = torch.Generator().manual_seed(0)
    if fusion == "late":
        feats = {m: {t: torch.randn(B, TASKS[t].num_outputs, generator=g) for t in TASKS.names} for m in MODS}
        nan = {m: {t: torch.where(masks[m][:, None], x, float("nan")) for t, x in d.items()}
               for m, d in feats.items()}
        clean, poisoned = model.fusion(feats, masks), model.fusion(nan, masks)
        assert all(torch.equal(clean[t], poisoned[t]) and torch.isfinite(clean[t]).all() for t in clean)
        return
    feats = {m: torch.randn(B, 16, generator=g) for m in MODS}
    nan = {m: torch.where(masks[m][:, None], x, float("nan")) for m, x in feats.items()}
    with torch.no_grad():
        clean, poisoned = model.fusion(feats, masks), model.fusion(nan, masks)
    assert torch.isfinite(clean).all() and torch.equal(clean, poisoned)


def test_time_warped_audio_ignores_speaking_rate_and_padding():
    from mtml_models.encoders import AudioCNN

    torch.manual_seed(0)
    enc = AudioCNN(16, n_mels=8, width=8, depth=2, frames=12).eval()
    slow = torch.nn.functional.interpolate(torch.randn(1, 8, 5), size=40, mode="linear", align_corners=True)
    fast = torch.nn.functional.interpolate(slow, size=20, mode="linear", align_corners=True)  # same word, 2x rate
    batch = torch.zeros(2, 8, 50)
    batch[0, :, :40], batch[1, :, :20] = slow[0], fast[0]
    batch[1, :, 20:] = float("nan")  # padding is never read
    with torch.no_grad():
        z, _ = enc(batch, torch.tensor([40, 20]), torch.tensor([True, True]))
    assert torch.isfinite(z).all()
    assert torch.allclose(z[0], z[1], atol=0.05 * float(z[0].abs().max()))
    plain = AudioCNN(16, n_mels=8, width=8, depth=2).eval()
    plain.load_state_dict(enc.state_dict())
    with torch.no_grad():
        zp, _ = plain(batch.nan_to_num(0.0), torch.tensor([40, 20]), torch.tensor([True, True]))
    assert not torch.allclose(zp[0], zp[1], atol=0.05 * float(zp[0].abs().max()))


@pytest.mark.parametrize("fused,independent", [(0.0, True), (1.0, False)])
def test_fused_loss_zero_trains_late_branches_independently(fused, independent):
    """With fused_loss=0 the image branch's gradient does not depend on the audio: an ensemble in one model."""
    from mtml_models.losses import step_losses

    model = MultiTaskModel(TASKS, make_cfg("late", modalities=("image", "audio")))

    def image_grads(batch):
        model.zero_grad()
        out = model(batch, parts=True)
        losses = step_losses(out, batch, TASKS, model.target_stats, fused=fused, aux=1.0)
        sum(losses.values()).backward()
        return torch.cat([p.grad.flatten() for p in model.encoders["image"].parameters()])

    a, b = make_batch(seed=1), make_batch(seed=1)
    b = dataclasses.replace(b, audio_features=b.audio_features.flip(0))  # other audio, same images and labels
    same = torch.allclose(image_grads(a), image_grads(b))
    assert same == independent


def test_fused_loss_config_errors():
    from mtml_models.config import TrainConfig

    with pytest.raises(ConfigError, match="nothing to learn"):
        TrainConfig.from_dict({"fused_loss": 0, "aux_loss": 0})
    with pytest.raises(ConfigError, match="fused_loss"):
        TrainConfig.from_dict({"fused_loss": -1})
    with pytest.raises(ConfigError, match="late fusion"):
        TrainConfig.from_dict({"aux_loss": 1, "model": {"fusion": "concat"}})
    with pytest.raises(ConfigError, match="without a gradient"):
        TrainConfig.from_dict({"fused_loss": 0, "aux_loss": 1,
                               "model": {"fusion": {"name": "late", "late_weights": "learned"}}})


def test_late_branch_parameters_partition_the_model():
    late = MultiTaskModel(TASKS, make_cfg({"name": "late", "late_weights": "learned"}, modalities=("image", "audio")))
    groups = late.branch_parameters()
    ids = [id(p) for g in groups for p in g]
    assert len(groups) == 3 and len(ids) == len(set(ids)) == len(list(late.parameters()))
    assert {id(p) for p in late.encoders["audio"].parameters()} <= {id(p) for p in groups[1]}
    concat = MultiTaskModel(TASKS, make_cfg("concat"))
    assert [len(g) for g in concat.branch_parameters()] == [len(list(concat.parameters()))]


def test_late_fusion_fixed_weights_renormalise_over_present_modalities():
    from mtml_models.fusion import LateFusion

    fuse = LateFusion(("image", "audio"), ["digit"], weights={"audio": 0.5})
    outputs = {"image": {"digit": torch.tensor([[3.0, 0.0]] * 3)}, "audio": {"digit": torch.tensor([[0.0, 6.0]] * 3)}}
    masks = {"image": torch.tensor([True, True, False]), "audio": torch.tensor([True, False, True])}
    out = fuse(outputs, masks)["digit"]
    assert torch.allclose(out[0], torch.tensor([2.0, 2.0]))  # (1 * image + 0.5 * audio) / 1.5
    assert torch.allclose(out[1], torch.tensor([3.0, 0.0])) and torch.allclose(out[2], torch.tensor([0.0, 6.0]))
    with pytest.raises(ConfigError, match="late_weights"):
        LateFusion(("image", "audio"), ["digit"], weights={"text": 2.0})
    for bad in (0, float("nan"), float("inf"), True, "0.5"):
        with pytest.raises(ConfigError, match="late_weights"):
            LateFusion(("image", "audio"), ["digit"], weights={"audio": bad})
    cfg = make_cfg({"name": "late", "late_weights": {"audio": 0.5}}, modalities=("image", "audio"))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


def test_the_audio_branch_reads_what_the_pipeline_makes_of_the_waveform():
    """The Pipeline replaces the waveform by its features (``audio`` None after it): with the recipe's config
    the audio encoder must run on those, and the audio branch's logits must follow the waveform."""
    from mmdata.augment import Pipeline
    from mtml_models.config import load_config

    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "configs" / "avmnist.yaml")
    tasks = TaskList((Task("digit", "classification", tuple("0123456789")),))
    torch.manual_seed(0)
    model, pipeline = MultiTaskModel(tasks, cfg.model).eval(), Pipeline(cfg.augment, sample_rate=8000).eval()
    g = torch.Generator().manual_seed(0)

    def batch(wave: torch.Tensor) -> Batch:
        n = len(wave)
        return Batch(keys=[f"s{i}" for i in range(n)], image=torch.rand(n, 3, 28, 28, generator=g),
                     image_mask=torch.ones(n, dtype=torch.bool), audio=wave,
                     audio_lengths=torch.full((n,), wave.shape[1]), audio_mask=torch.ones(n, dtype=torch.bool),
                     labels={"digit": torch.arange(n)}, label_mask={"digit": torch.ones(n, dtype=torch.bool)})

    calls = []
    model.encoders["audio"].register_forward_hook(lambda *a: calls.append(1))
    wave = torch.randn(4, 8000, generator=g) * 0.1
    with torch.no_grad():
        _, one = model(pipeline(batch(wave)), parts=True)  # the recipe is late fusion: per-modality outputs
        _, two = model(pipeline(batch(wave.flip(1))), parts=True)
    assert calls == [1, 1]  # the encoder ran on every batch
    assert not torch.allclose(one["audio"]["digit"], two["audio"]["digit"])  # and what it reads is the clip
