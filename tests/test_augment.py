"""Augmentation: per-sample randomness, exact replay, eval determinism, masks and lengths kept, CPU == CUDA."""

from __future__ import annotations

import pickle

import pytest
import torch

from mmdata.augment import (
    Audio,
    AugmentConfig,
    ColorJitter,
    FreqWarp,
    GaussianBlur,
    ImageConfig,
    Pipeline,
    RandomGrayscale,
    ResizedCropFlip,
    SpecAugment,
    TimeShift,
    TokenDelete,
    TokenMask,
    Tokens,
    params_to,
)
from mmdata.augment.config import AudioConfig, TextConfig
from mmdata.augment.mix import sample_beta
from mmdata.batch import Batch
from mmdata.errors import ConfigError
from mmdata.tasks import Task, TaskList

SR = 8000
TASKS = TaskList((Task("digit", "classification", tuple("0123456789")), Task("score", "regression")))
MIX = {"mixup_alpha": 0.4, "cutmix_alpha": 1.0, "p": 1.0}


def gen(seed: int = 0, device: str = "cpu") -> torch.Generator:
    return torch.Generator(device=device).manual_seed(seed)


def make_batch(B: int = 4, same_image: bool = False, device: str = "cpu") -> Batch:
    """Image values encode the index; audio lengths shrink with the index (last sample has no audio)."""
    g = gen(123)
    img = torch.randint(0, 256, (1 if same_image else B, 3, 40, 48), generator=g, dtype=torch.uint8)
    T = SR // 2
    lengths = torch.tensor([T * (B - i) // B for i in range(B)])
    lengths[-1] = 0
    audio = torch.randn(B, T, generator=g) * (torch.arange(T) < lengths[:, None])
    ids = torch.tensor([[2] + [10 + i + j for j in range(6)] + [3, 0, 0] for i in range(B)])
    attn = (ids != 0).long()
    return Batch(
        keys=[f"k{i}" for i in range(B)], image=img.expand(B, -1, -1, -1).contiguous(),
        image_mask=torch.ones(B, dtype=torch.bool), audio=audio, audio_lengths=lengths,
        audio_mask=lengths > 0, text_ids=ids, attention_mask=attn, text_mask=torch.ones(B, dtype=torch.bool),
        labels={"digit": torch.arange(B) % 10, "score": torch.arange(B, dtype=torch.float32).view(B, 1)},
        label_mask={"digit": torch.tensor([i != 1 for i in range(B)]), "score": torch.ones(B, dtype=torch.bool)},
    ).to(device)


def pipeline(**sections) -> Pipeline:
    return Pipeline(AugmentConfig.from_dict(sections), sample_rate=SR, tasks=TASKS)


def assert_batches_equal(a: Batch, b: Batch) -> None:
    for name in ("image", "audio_features", "audio_feature_lengths", "text_ids", "attention_mask", "image_mask", "audio_mask"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=0, atol=0)
    for t in a.labels:
        torch.testing.assert_close(a.labels[t], b.labels[t], rtol=0, atol=0)


# ---------------------------------------------------------------- config


def test_config_round_trips_and_names_unknown_keys():
    cfg = AugmentConfig.from_dict({"image": {"size": [24, 20]}, "audio": {"normalize": "bin"}, "mix": MIX})
    assert AugmentConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="brightnes"):
        AugmentConfig.from_dict({"image": {"brightnes": 0.2}})
    with pytest.raises(ConfigError, match="colour"):
        AugmentConfig.from_dict({"colour": {}})
    with pytest.raises(ConfigError, match="normalize"):
        AugmentConfig.from_dict({"audio": {"normalize": "global"}})
    with pytest.raises(ConfigError, match="scale"):
        ImageConfig(scale=(0.9, 0.1))


def test_sample_rate_from_card_and_errors_that_say_the_fix():
    with pytest.raises(ConfigError, match="sample_rate"):
        Pipeline(AugmentConfig())(make_batch(), generator=gen())
    with pytest.raises(ConfigError, match="disagrees"):
        Pipeline(AugmentConfig.from_dict({"audio": {"sample_rate": 16000}}), sample_rate=SR)
    with pytest.raises(ConfigError, match="generator"):
        pipeline()(make_batch())
    with pytest.raises(ConfigError, match="tasks"):
        Pipeline(AugmentConfig.from_dict({"mix": MIX}), sample_rate=SR)(make_batch(), generator=gen())


# ---------------------------------------------------------------- the pipeline


def test_pipeline_output_shapes_dtypes_and_masks():
    b = make_batch()
    out = pipeline(image={"size": [24, 20]}, audio={"n_mels": 32})(b, generator=gen())
    assert out.image.shape == (4, 3, 24, 20) and out.image.dtype == torch.float32
    assert out.audio_features.shape[:2] == (4, 32) and out.audio is None
    hop = SR // 100
    assert out.audio_feature_lengths.tolist() == [int(n) // hop + 1 if n > 0 else 0 for n in b.audio_lengths]
    assert out.text_ids.shape == b.text_ids.shape
    torch.testing.assert_close(out.audio_mask, b.audio_mask)  # no dropout configured: masks kept
    assert out.labels["digit"].dtype == torch.long  # no mixing configured: labels untouched
    assert b.image.dtype == torch.uint8 and b.audio_features is None  # input batch not modified: still the waveform


def test_two_identical_samples_get_different_crops():
    out = pipeline()(make_batch(same_image=True), generator=gen())
    assert not torch.allclose(out.image[0], out.image[1])
    assert not torch.allclose(out.image[1], out.image[2])


def test_same_seed_replays_exactly_and_another_seed_differs():
    aug = pipeline(mix={**MIX, "modality_dropout": 0.3}, text={"mask_p": 0.3, "delete_p": 0.2})
    b = make_batch(8)
    a1, a2, a3 = (aug(b, generator=gen(s)) for s in (7, 7, 8))
    assert_batches_equal(a1, a2)
    assert not torch.equal(a1.image, a3.image)
    assert not torch.equal(a1.audio_features, a3.audio_features)


def test_returned_params_replay_exactly():
    aug = pipeline(mix={**MIX, "modality_dropout": 0.3}, text={"mask_p": 0.3, "delete_p": 0.2})
    b = make_batch(6)
    out, params = aug(b, generator=gen(3), return_params=True)
    assert_batches_equal(out, aug(b, params=params))
    crop = ResizedCropFlip(ImageConfig(size=(16, 16)))
    y, p = crop(b.image, generator=gen(1), return_params=True)
    assert torch.equal(y, crop(b.image, params=p))


def test_eval_is_deterministic_and_leaves_labels_and_text_alone():
    aug = pipeline(mix={**MIX, "modality_dropout": 0.9}, text={"mask_p": 0.9}).eval()
    b = make_batch()
    o1, o2 = aug(b), aug(b, generator=gen(5))
    assert_batches_equal(o1, o2)
    assert torch.equal(o1.text_ids, b.text_ids) and torch.equal(o1.labels["digit"], b.labels["digit"])
    torch.testing.assert_close(o1.image_mask, b.image_mask)


def test_eval_on_an_image_already_at_size_is_only_normalisation():
    cfg = ImageConfig(size=(40, 48))
    b = make_batch()
    out = pipeline(image={"size": [40, 48]}).eval()(b).image
    mean, std = torch.tensor(cfg.mean).view(1, 3, 1, 1), torch.tensor(cfg.std).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (b.image.float() / 255 - mean) / std, atol=1e-4, rtol=0)


def test_none_modalities_stay_none():
    b = make_batch()
    only_image = Batch(keys=b.keys, image=b.image, image_mask=b.image_mask)
    out = pipeline(mix={"modality_dropout": 0.5})(only_image, generator=gen())
    assert out.audio is None and out.audio_features is None and out.text_ids is None and out.audio_mask is None
    assert out.image_mask.all()  # the only modality is never dropped
    only_text = Batch(keys=b.keys, text_ids=b.text_ids, attention_mask=b.attention_mask, text_mask=b.text_mask)
    assert Pipeline()(only_text, generator=gen()).image is None  # no sample rate needed without audio


def test_never_touches_the_global_rng():
    aug = pipeline(mix={**MIX, "modality_dropout": 0.3}, text={"mask_p": 0.3, "delete_p": 0.2}, image={"blur_p": 0.5})
    torch.manual_seed(0)
    state = torch.get_rng_state()
    aug(make_batch(), generator=gen())
    assert torch.equal(torch.get_rng_state(), state)


def test_pickles_and_gives_the_same_result():
    aug = pipeline(mix=MIX)
    clone = pickle.loads(pickle.dumps(aug))
    b = make_batch()
    assert_batches_equal(aug(b, generator=gen(2)), clone(b, generator=gen(2)))


# ---------------------------------------------------------------- image ops


def test_full_box_with_flip_mirrors_the_image_exactly():
    x = make_batch().image
    crop = ResizedCropFlip(ImageConfig(size=(40, 48)))
    box = torch.tensor([[24.0, 20.0, 48.0, 40.0]]).expand(4, 4)
    y = crop.apply(x, {"box": box, "flip": torch.tensor([True, False, True, False])})
    torch.testing.assert_close(y[0], x[0].float().flip(-1) / 255, atol=1e-5, rtol=0)
    torch.testing.assert_close(y[1], x[1].float() / 255, atol=1e-5, rtol=0)


def test_colour_ops_identity_grayscale_and_blur():
    x = make_batch().image.float() / 255
    cfg = ImageConfig(jitter_p=1.0, grayscale_p=1.0, blur_p=1.0)
    jitter = ColorJitter(cfg).eval()
    torch.testing.assert_close(jitter(x), x, atol=1e-5, rtol=0)  # eval params are the identity
    y = ColorJitter(cfg)(x, generator=gen())
    assert not torch.allclose(y, x) and y.min() >= 0 and y.max() <= 1
    g = RandomGrayscale(cfg)(x, generator=gen())
    assert torch.equal(g[:, 0], g[:, 1]) and torch.equal(g[:, 1], g[:, 2])
    blur = GaussianBlur(cfg)
    flat = torch.full((2, 3, 9, 9), 0.3)
    torch.testing.assert_close(blur(flat, generator=gen()), flat)
    assert blur(x, generator=gen()).var() < x.var()


# ---------------------------------------------------------------- audio ops


def test_padded_frames_stay_zero_and_masks_stay_within_length():
    cfg = AudioConfig(time_masks=4, time_mask_frames=30, freq_masks=2)
    b = make_batch(6)
    aug = pipeline(audio={"time_masks": 4, "time_mask_frames": 30})
    for seed in range(5):
        out, params = aug(b, generator=gen(seed), return_params=True)
        F = out.audio_features.shape[-1]
        valid = torch.arange(F) < out.audio_feature_lengths[:, None]  # (B,F)
        assert (out.audio_features * ~valid[:, None, :] == 0).all()
        sp = params["audio"]["specaug"]
        end = sp["time_start"] + sp["time_width"]
        assert (end <= out.audio_feature_lengths[:, None]).all() and (sp["time_width"] <= cfg.time_mask_frames).all()
    # a SpecAugment op on its own: masked cells are inside [0, length)
    feats = Audio(torch.ones(3, 8, 50), torch.tensor([50, 10, 0]))
    y = SpecAugment(cfg)(feats, generator=gen()).values
    assert (y[1, :, 10:] == 1).all() and (y[2] == 1).all()


def test_features_ignore_padding():
    b = make_batch(4)
    aug = pipeline().eval()
    alone = Batch(keys=b.keys[1:2], audio=b.audio[1:2, : int(b.audio_lengths[1])], audio_lengths=b.audio_lengths[1:2])
    f_alone = aug(alone).audio_features[0]
    f_batch = aug(b).audio_features[1, :, : f_alone.shape[-1]]
    torch.testing.assert_close(f_batch, f_alone, atol=1e-4, rtol=1e-4)


def test_time_shift_stays_within_valid_length():
    wave = torch.arange(1, 11, dtype=torch.float32).repeat(2, 1)  # (2,10)
    x = Audio(wave * (torch.arange(10) < torch.tensor([[10], [6]])), torch.tensor([10, 6]))
    y = TimeShift(AudioConfig(shift_max=0.5)).apply(x, {"shift": torch.tensor([0.2, 0.5])})
    assert y.values[0].tolist() == [9, 10, 1, 2, 3, 4, 5, 6, 7, 8]
    assert y.values[1].tolist() == [4, 5, 6, 1, 2, 3, 0, 0, 0, 0]


def test_noise_hits_the_requested_snr():
    aug = pipeline(audio={"noise_p": 1.0, "snr_db": [10.0, 10.0], "gain_p": 0.0, "shift_p": 0.0})
    wave = torch.sin(torch.linspace(0, 2000, SR)).repeat(2, 1)
    noisy = aug.audio.noise(Audio(wave, torch.tensor([SR, SR])), generator=gen()).values
    snr = 10 * torch.log10(wave.square().mean(1) / (noisy - wave).square().mean(1))
    torch.testing.assert_close(snr, torch.full((2,), 10.0), atol=0.3, rtol=0)


# ---------------------------------------------------------------- text ops


def test_text_masking_and_deletion_stay_within_the_attention_mask():
    cfg = TextConfig(mask_p=1.0, delete_p=0.5)
    b = make_batch()
    x = Tokens(b.text_ids, b.attention_mask)
    m = TokenMask(cfg)(x, generator=gen()).ids
    assert (m[:, 1:7] == cfg.mask_id).all()  # every ordinary token masked
    assert torch.equal(m[:, [0, 7, 8, 9]], b.text_ids[:, [0, 7, 8, 9]])  # cls, sep, padding untouched
    d = TokenDelete(cfg)(x, generator=gen())
    n = d.attention_mask.sum(1)
    assert (n < 8).any() and (n >= 2).all()
    for row, length in zip(d.ids, n):
        assert row[0] == 2 and row[length - 1] == 3 and (row[length:] == 0).all()
        kept = row[1 : length - 1].tolist()
        assert kept == sorted(kept)  # order kept


# ---------------------------------------------------------------- mix and dropout


def test_modality_dropout_updates_masks_and_zeroes_inputs():
    b = make_batch(8)
    out = pipeline(mix={"image_dropout": 1.0, "audio_dropout": 0.0, "text_dropout": 0.0})(b, generator=gen())
    assert not out.image_mask.any() and (out.image == 0).all()
    torch.testing.assert_close(out.audio_mask, b.audio_mask)
    out = pipeline(mix={"modality_dropout": 1.0})(b, generator=gen())
    present = torch.stack([out.image_mask, out.audio_mask, out.text_mask], 1)
    assert (present.sum(1) == 1).all()  # never drops a sample's last modality
    assert (out.audio_features[~out.audio_mask] == 0).all() and (out.audio_feature_lengths[~out.audio_mask] == 0).all()
    assert (out.attention_mask[~out.text_mask] == 0).all() and (out.text_ids[~out.text_mask] == 0).all()
    assert (out.image[~out.image_mask] == 0).all()


def test_mixup_soft_labels_and_label_masks():
    b = make_batch(8)
    out, params = pipeline(mix=MIX)(b, generator=gen(4), return_params=True)
    y, m = out.labels["digit"], out.label_mask["digit"]
    assert y.shape == (8, 10) and y.dtype == torch.float32
    torch.testing.assert_close(y[m].sum(1), torch.ones(int(m.sum())))
    perm, lam = params["mix"]["perm"], params["mix"]["lam"]
    had = b.label_mask["digit"]
    assert torch.equal(m, had & (had[perm] | (lam >= 1)))
    assert not m[1]  # sample 1 has no digit label
    expect = lam * b.labels["score"][:, 0] + (1 - lam) * b.labels["score"][perm, 0]
    torch.testing.assert_close(out.labels["score"][:, 0], expect)
    assert ((lam > 0) & (lam <= 1)).all() and (lam < 1).any()


def test_mixup_blends_images_with_lam():
    b = make_batch(6)
    aug = pipeline(mix={"mixup_alpha": 1.0})
    out, params = aug(b, generator=gen(9), return_params=True)
    img = aug.image.apply(b.image, params["image"])
    perm, lam = params["mix"]["perm"], params["mix"]["lam"].view(-1, 1, 1, 1)
    torch.testing.assert_close(out.image, lam * img + (1 - lam) * img[perm], atol=1e-5, rtol=0)


def test_cutmix_pastes_the_partner_box_and_weights_labels_by_area():
    b = make_batch(6)
    aug = pipeline(mix={"cutmix_alpha": 1.0}, image={"size": [20, 24]})
    out, params = aug(b, generator=gen(2), return_params=True)
    img = aug.image.apply(b.image, params["image"])
    perm, lam, box = params["mix"]["perm"], params["mix"]["lam"], params["mix"]["box"]
    assert ((box[:, 1] > box[:, 0]) & (box[:, 3] > box[:, 2])).any()
    for i in range(6):
        y0, y1, x0, x1 = box[i].tolist()
        inside = torch.zeros(20, 24, dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        torch.testing.assert_close(out.image[i][:, inside], img[perm[i]][:, inside])
        torch.testing.assert_close(out.image[i][:, ~inside], img[i][:, ~inside])
        torch.testing.assert_close(lam[i], torch.tensor(1 - inside.float().mean().item()))


def test_beta_draws_have_the_right_mean_and_spread():
    lam = sample_beta(gen(), 4000, 0.4, torch.device("cpu"))
    assert abs(lam.mean().item() - 0.5) < 0.03
    assert abs(lam.var().item() - 0.25 / 1.8) < 0.02  # Var Beta(a,a) = 1 / (4 (2a + 1))


# ---------------------------------------------------------------- compile and CUDA


@pytest.mark.slow
def test_crop_flip_compiles():
    crop = ResizedCropFlip(ImageConfig(size=(8, 8)))
    x = torch.rand(2, 3, 12, 12)
    params = crop.make_params(x, gen())
    compiled = torch.compile(crop.apply, dynamic=False)
    torch.testing.assert_close(compiled(x, params), crop.apply(x, params), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_cpu_and_cuda_agree_for_fixed_params():
    aug = pipeline(mix={**MIX, "modality_dropout": 0.3}, text={"mask_p": 0.3, "delete_p": 0.2},
                   image={"blur_p": 0.5}, audio={"warp_p": 0.5})
    b = make_batch(8)
    out_cpu, params = aug(b, generator=gen(11), return_params=True)
    aug_cuda = pickle.loads(pickle.dumps(aug)).cuda()
    out_cuda = aug_cuda(b.to("cuda"), params=params_to(params, torch.device("cuda")))
    for name in ("image", "audio_features", "audio_feature_lengths", "text_ids", "image_mask", "audio_mask", "text_mask"):
        torch.testing.assert_close(getattr(out_cuda, name).cpu(), getattr(out_cpu, name), atol=2e-3, rtol=1e-3)
    torch.testing.assert_close(out_cuda.labels["digit"].cpu(), out_cpu.labels["digit"], atol=1e-5, rtol=0)
    # a CPU generator gives the same draws whatever the batch's device
    torch.testing.assert_close(aug_cuda(b.to("cuda"), generator=gen(11)).image.cpu(), out_cpu.image,
                               atol=2e-3, rtol=1e-3)


@pytest.mark.gpu
def test_cuda_generator_per_sample_and_replay():
    aug = pipeline(mix=MIX).cuda()
    b = make_batch(8, same_image=True, device="cuda")
    o1 = aug(b, generator=gen(1, "cuda"))
    o2 = aug(b, generator=gen(1, "cuda"))
    assert_batches_equal(o1, o2)
    assert not torch.allclose(o1.image[0], o1.image[1])


@pytest.mark.gpu
def test_no_host_device_sync_inside():
    aug = pipeline(mix={**MIX, "modality_dropout": 0.3}, text={"mask_p": 0.3, "delete_p": 0.2},
                   image={"blur_p": 0.5}, audio={"warp_p": 0.5}).cuda()
    b = make_batch(8, device="cuda")
    g = gen(0, "cuda")
    aug(b, generator=g)  # warm-up: lazy init may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        aug(b, generator=g)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_freq_warp_moves_energy_per_sample_and_keeps_padding():
    cfg = AudioConfig(warp_p=1.0, warp=0.2)
    M, F = 40, 12
    feats = torch.zeros(3, M, F)
    feats[:, 20, :8] = 1.0  # one band lit over the valid frames
    x = Audio(feats, torch.tensor([8, 8, 8]))
    op = FreqWarp(cfg)
    y = op(x, params={"alpha": torch.tensor([1.0, 1.2, 1 / 1.2])}).values
    assert torch.equal(y[0], feats[0])  # alpha 1: unchanged
    peak = y[:, :, 0].argmax(1).tolist()
    assert peak[1] > 20 > peak[2]  # a shorter vocal tract moves up the mel axis, a longer one down
    assert (y[:, :, 8:] == 0).all()  # padding frames untouched
    a = op(x, generator=gen(1), return_params=True)[1]["alpha"]
    b = op(x, generator=gen(1), return_params=True)[1]["alpha"]
    assert torch.equal(a, b) and len(set(a.tolist())) == 3  # replayable, one factor per sample
    assert ((a >= 1 / 1.2 - 1e-6) & (a <= 1.2 + 1e-6)).all()
    assert torch.equal(op.eval()(x).values, feats)
    with pytest.raises(ConfigError, match="warp"):
        AudioConfig(warp=1.5)


def test_warp_off_keeps_the_random_stream():
    """Configs without the warp draw exactly what they drew before it existed."""
    b = make_batch()
    off = pipeline(audio={"sample_rate": SR})
    _, params = off(b, generator=gen(3), return_params=True)
    assert "warp" not in params["audio"]
    on = pipeline(audio={"sample_rate": SR, "warp_p": 1.0})
    _, params_on = on(b, generator=gen(3), return_params=True)
    assert torch.equal(params_on["audio"]["gain"]["gain_db"], params["audio"]["gain"]["gain_db"])
    assert not torch.equal(params_on["audio"]["specaug"]["time_start"], params["audio"]["specaug"]["time_start"])


def test_cepstra_are_the_mfccs_of_the_log_mel_and_keep_padding_zero():
    import torchaudio

    audio = {"n_mels": 40, "win_ms": 32, "hop_ms": 8, "cepstra": 13, "normalize": "none", "freq_mask_bins": 3}
    aug = pipeline(audio=audio).eval()
    b = make_batch(4)
    out = aug(b)
    assert out.audio_features.shape[1] == 13
    mfcc = torchaudio.transforms.MFCC(SR, n_mfcc=13, log_mels=True, melkwargs={
        "n_fft": 256, "win_length": 256, "hop_length": 64, "n_mels": 40, "center": True, "pad_mode": "constant"})
    full = int(out.audio_feature_lengths[0])  # the first sample has no padding
    torch.testing.assert_close(out.audio_features[0, :, :full], mfcc(b.audio[0, : int(b.audio_lengths[0])]), atol=1e-3,
                               rtol=1e-4)
    valid = torch.arange(out.audio_features.shape[-1]) < out.audio_feature_lengths[:, None]
    assert (out.audio_features * ~valid[:, None, :] == 0).all()
    # trained on them, SpecAugment's frequency masks cover coefficients; the same seed replays
    train = pipeline(audio={**audio, "normalize": "bin"})
    a, b2 = train(b, generator=gen(5)), train(b, generator=gen(5))
    assert a.audio_features.shape[1] == 13 and torch.equal(a.audio_features, b2.audio_features)
    with pytest.raises(ConfigError, match="cepstra"):
        AudioConfig(n_mels=40, cepstra=41)
    with pytest.raises(ConfigError, match="warp_p"):
        AudioConfig(cepstra=13, warp_p=0.5)
