"""Logistic-regression baselines for avmnist digit (and parity, read off the digit) accuracy, leave-one-speaker-out.

Features: raw pixels (image); 40-band log-mel at 24 interpolated frames plus per-band mean and std
(audio); both concatenated (fusion); and, as a fourth row, the first 13 DCT coefficients of that
log-mel (MFCCs) in the same layout (audio_mfcc13). Reads the raw manifest, not shards, so it shares
no code path with the models it is compared to.

    python tools/baselines.py --source ../shared/data/avmnist-dev --json runs/baselines.json
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import librosa
import numpy as np
import soundfile as sf
import torch
from PIL import Image

SPEAKERS = ("george", "jackson", "lucas", "nicolas", "yweweler")
FEATURES = ("image", "audio", "fusion", "audio_mfcc13")


def audio_features(path: Path, n_mels: int = 40, frames: int = 24, mfcc: int = 0) -> np.ndarray:
    """(bins*frames + 2*bins,) log-mel (or its first ``mfcc`` DCT coefficients) resampled in time, plus
    per-bin mean and std."""
    wav, sr = sf.read(path, dtype="float32", always_2d=True)
    mel = librosa.feature.melspectrogram(y=wav.mean(1), sr=sr, n_fft=256, hop_length=64, n_mels=n_mels)
    feats = np.log(mel + 1e-6)  # (M, F)
    if mfcc:
        feats = librosa.feature.mfcc(S=feats, n_mfcc=mfcc)  # (mfcc, F), orthonormal DCT-II
    t = torch.from_numpy(np.ascontiguousarray(feats))[None]  # (1, bins, F)
    warped = torch.nn.functional.interpolate(t, size=frames, mode="linear", align_corners=True)[0]
    return np.concatenate([warped.numpy().ravel(), feats.mean(1), feats.std(1)])


def load(source: Path) -> dict[str, np.ndarray]:
    rows = list(csv.DictReader(open(source / "manifest.csv")))
    img = np.stack([np.asarray(Image.open(source / r["image"]).convert("L"), np.float32).ravel() / 255 for r in rows])
    aud = np.stack([audio_features(source / r["audio"]) for r in rows]).astype(np.float32)
    mfcc = np.stack([audio_features(source / r["audio"], mfcc=13) for r in rows]).astype(np.float32)
    return {"image": img, "audio": aud, "fusion": np.concatenate([img, aud], 1), "audio_mfcc13": mfcc,
            "digit": np.array([int(r["digit"]) for r in rows]), "speaker": np.array([r["speaker"] for r in rows])}


def fit_predict(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, l2: float = 1e-3) -> np.ndarray:
    """Multinomial logistic regression with L2, fitted by L-BFGS on standardised features."""
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6
    a, b = torch.from_numpy((xtr - mu) / sd), torch.from_numpy((xte - mu) / sd)
    y = torch.from_numpy(ytr)
    w = torch.zeros(a.shape[1], 10, requires_grad=True)
    bias = torch.zeros(10, requires_grad=True)
    opt = torch.optim.LBFGS([w, bias], lr=1, max_iter=300, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(a @ w + bias, y) + l2 * (w**2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return (b @ w + bias).argmax(1).numpy()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path,
                    default=Path(__file__).resolve().parents[1].parent / "shared" / "data" / "avmnist-dev")
    ap.add_argument("--json", type=Path, help="also write the table here")
    args = ap.parse_args()
    data = load(args.source)
    table: dict[str, dict[str, float]] = {}
    for spk in SPEAKERS:
        test = data["speaker"] == spk
        table[spk] = {}
        for feats in FEATURES:
            x = data[feats]
            pred = fit_predict(x[~test], data["digit"][~test], x[test])
            table[spk][feats] = float((pred == data["digit"][test]).mean())
            # parity read off the predicted digit (pixels are not linearly separable by parity itself)
            table[spk][f"{feats}_parity"] = float((pred % 2 == data["digit"][test] % 2).mean())
        print(f"{spk:9s} " + "  ".join(f"{k} {v:.3f}" for k, v in table[spk].items()), flush=True)
    for feats in FEATURES:
        v = np.array([table[s][feats] for s in SPEAKERS])
        print(f"{feats:12s} mean {v.mean():.3f}  min {v.min():.3f}  max {v.max():.3f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
