"""`mmdata show`: a contact sheet of samples (image, waveform, log-mel, text, key, labels), or the rejects.

With an augmentation config the same samples are drawn before and after ``mmdata.augment.Pipeline``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .cli import add_storage_options
from .errors import ConfigError, DecodeError
from .format import AUDIO_EXTS, IMAGE_EXTS, META_EXT, TEXT_EXT

log = logging.getLogger(__name__)

PLAIN_COLUMNS = ("image", "waveform", "log-mel", "text and labels")
AUGMENT_COLUMNS = ("image", "augmented", "waveform", "log-mel", "augmented log-mel", "text and labels")


@dataclass
class Shown:
    """One sample as drawn: decoded media (None when absent) and labels by class name."""

    key: str
    members: dict[str, bytes]
    image: np.ndarray | None = None  # uint8 (H,W,3)
    audio: np.ndarray | None = None  # float32 (T,)
    text: str | None = None
    source_id: str | None = None
    labels: dict[str, str] = field(default_factory=dict)  # task -> class name(s) / value, "-" when missing


def pick_samples(ds, split: str, n: int, seed: int = 0) -> list[Shown]:
    """``n`` distinct samples of ``split`` drawn with ``seed`` (in index order), read and decoded on the CPU.

    A sample that cannot be read or decoded raises its error (naming shard, key and byte offset).
    """
    from .reader import ShardReader, read_stream, sample_error

    if n < 1:
        raise ConfigError(f"-n must be positive, got {n}")
    reader = ShardReader(ds, split)
    idx = reader.index
    if len(idx) == 0:
        raise ConfigError(f"split {split!r} has no samples; pick another with --split")
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(len(idx), size=min(n, len(idx)), replace=False))  # (n,)
    out = []
    try:
        for p, got in read_stream(reader, picks):
            if isinstance(got, Exception):
                raise got
            i = int(picks[p])
            key = str(idx.keys[i])
            try:
                out.append(_decode(key, got, ds.tasks))
            except Exception as e:  # noqa: BLE001 - the bytes are the dataset's: any failure is theirs
                raise sample_error(DecodeError, idx.files[idx.shard[i]], key, int(idx.offset[i]),
                                   f"cannot be decoded: {type(e).__name__}: {e}") from None
    finally:
        reader.close()
    return out


def _decode(key: str, members: dict[str, bytes], tasks) -> Shown:
    """The sample as drawn, decoded by the loader's member decoders (the stored size, the stored rate)."""
    from .decode import decode_labels, decode_meta, decode_rgb, decode_text, read_audio

    s = Shown(key, members)
    ext = next((e for e in IMAGE_EXTS if e in members), None)
    if ext:
        s.image = decode_rgb(members[ext]).permute(1, 2, 0).numpy()  # (H, W, 3)
    ext = next((e for e in AUDIO_EXTS if e in members), None)
    if ext:
        s.audio = read_audio(members[ext])[0]  # (T,)
    if TEXT_EXT in members:
        s.text = decode_text(members[TEXT_EXT])
    meta = decode_meta(members.get(META_EXT))
    s.source_id = meta.get("id")
    labels = decode_labels(tasks, meta)
    s.labels = {t.name: label_name(t, labels[t.name]) for t in tasks}
    return s


def label_name(task, value: Any) -> str:
    """A stored label as a person reads it: class name(s), numbers, or "-" when missing."""
    if value is None:
        return "-"
    if task.type == "classification":
        return task.classes[value]
    if task.type == "multilabel":
        return ", ".join(task.classes[i] for i in value) or "(none)"
    return ", ".join(f"{v:.3g}" for v in value)


def log_mel(audio: list[np.ndarray | None], sample_rate: int) -> list[np.ndarray | None]:
    """Log-mel (n_mels, F) of each clip, as the training features compute it (no normalisation)."""
    import torch

    from .augment.audio import Audio, LogMel
    from .augment.config import AudioConfig

    op = LogMel(AudioConfig(normalize="none"), sample_rate).eval()
    out = []
    for a in audio:
        if a is None or len(a) == 0:
            out.append(None)
            continue
        x = torch.from_numpy(a).unsqueeze(0)  # (1, T)
        feats = op(Audio(x, torch.tensor([x.shape[1]])))  # (1, M, F)
        out.append(feats.values[0].numpy())
    return out


def augmented(ds, shown: list[Shown], cfg_dict: dict[str, Any], seed: int) -> tuple[list, list, list]:
    """Run the augmentation Pipeline on the samples; return (images (H,W,3) float, log-mels before, after)."""
    import torch

    from .augment import AugmentConfig, Pipeline
    from .collate import collate
    from .decode import Decoder, DecodeSpec

    cfg = AugmentConfig.from_dict(cfg_dict)
    rate = ds.card.modalities.get("audio", {}).get("sample_rate")
    mods = tuple(m for m in ("image", "audio") if m in ds.card.modalities)
    spec = DecodeSpec(modalities=mods, tasks=tuple(ds.tasks), image_size=cfg.image.size, audio_samples=None,
                      sample_rate=rate, max_text_tokens=64)
    batch = collate([Decoder(spec, None)(s.key, s.members) for s in shown], spec)
    g = torch.Generator().manual_seed(seed)
    before = Pipeline(cfg, sample_rate=rate, tasks=ds.tasks).eval()(batch)
    after = Pipeline(cfg, sample_rate=rate, tasks=ds.tasks).train()(batch, generator=g)
    images: list = [None] * len(shown)
    if after.image is not None:
        mean = torch.tensor(cfg.image.mean).view(1, 3, 1, 1)
        std = torch.tensor(cfg.image.std).view(1, 3, 1, 1)
        pix = (after.image * std + mean).clamp(0, 1).permute(0, 2, 3, 1).numpy()  # (B, H, W, 3)
        images = [pix[i] if after.image_mask[i] else None for i in range(len(shown))]

    def feats(b) -> list:
        if b.audio_features is None:
            return [None] * len(shown)
        n = b.audio_feature_lengths
        return [b.audio_features[i, :, : int(n[i])].numpy() if b.audio_mask[i] and n[i] > 0
                else None for i in range(len(shown))]

    return images, feats(before), feats(after)


def contact_sheet(dataset, split: str, n: int = 8, seed: int = 0, augment: dict[str, Any] | None = None):
    """Draw ``n`` samples of ``split``, one row each; return the matplotlib Figure.

    Columns: image, waveform, log-mel, then text, key and labels. With ``augment`` (an AugmentConfig dict)
    the augmented image and augmented log-mel are drawn beside the originals.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .dataset import as_dataset

    ds = as_dataset(dataset)
    shown = pick_samples(ds, split, n, seed)
    rate = ds.card.modalities.get("audio", {}).get("sample_rate") or 16000
    mels = log_mel([s.audio for s in shown], rate)
    columns = AUGMENT_COLUMNS if augment is not None else PLAIN_COLUMNS
    # a modality the whole dataset lacks gets no column
    absent = {"image": ("image", "augmented"), "audio": ("waveform", "log-mel", "augmented log-mel")}
    for m, cols in absent.items():
        if m not in ds.card.modalities:
            columns = tuple(c for c in columns if c not in cols)
    unit = "mels"
    if augment is not None:
        aug_images, mels, aug_mels = augmented(ds, shown, augment, seed)
        if (augment.get("audio") or {}).get("cepstra"):  # the pipeline's features are MFCCs
            unit = "MFCCs"
    widths = {"image": 1.1, "augmented": 1.1, "waveform": 2.2, "log-mel": 2.2, "augmented log-mel": 2.2,
              "text and labels": 2.6}
    fig, axes = plt.subplots(len(shown), len(columns), squeeze=False,
                             figsize=(sum(widths[c] for c in columns) * 1.25, 1.45 * len(shown) + 0.5),
                             gridspec_kw={"width_ratios": [widths[c] for c in columns]})
    for r, s in enumerate(shown):
        for c, col in enumerate(columns):
            ax = axes[r, c]
            if col == "image":
                _image(ax, s.image)
            elif col == "augmented":
                _image(ax, aug_images[r])
            elif col == "waveform":
                _wave(ax, s.audio, rate)
            elif col == "log-mel":
                _mel(ax, mels[r], unit)
            elif col == "augmented log-mel":
                _mel(ax, aug_mels[r], unit)
            else:
                _text(ax, s)
            if r == 0:
                ax.set_title(col.replace("log-mel", "MFCC") if unit == "MFCCs" else col, fontsize=10,
                             fontweight="bold")
    title = f"{ds.root.rstrip('/').rsplit('/', 1)[-1]} / {split}: {len(shown)} of {ds.num_samples(split)} samples, seed {seed}"
    fig.suptitle(title + (" (augmented: train-mode Pipeline)" if augment is not None else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.985))
    return fig


def _blank(ax, what: str) -> None:
    ax.set_xticks([])
    ax.set_yticks([])
    ax.text(0.5, 0.5, f"no {what}", ha="center", va="center", color="0.5", fontsize=9, transform=ax.transAxes)
    for side in ax.spines.values():
        side.set_color("0.85")


def _image(ax, img) -> None:
    if img is None:
        return _blank(ax, "image")
    ax.imshow(img, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])


def _wave(ax, audio, rate: int) -> None:
    if audio is None:
        return _blank(ax, "audio")
    t = np.arange(len(audio)) / rate  # (T,) seconds
    ax.plot(t, audio, lw=0.5, color="tab:blue")
    ax.set_xlim(0, max(t[-1], 1e-3) if len(t) else 1)
    peak = float(np.abs(audio).max()) if len(audio) else 1.0
    ax.set_ylim(-1.05 * peak or -1, 1.05 * peak or 1)
    ax.set_yticks([])
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(4))
    ax.tick_params(axis="x", labelsize=7, pad=1)
    ax.set_xlabel(f"{len(audio) / rate:.2f} s at {rate} Hz", fontsize=7, labelpad=1)


def _mel(ax, mel, unit: str = "mels") -> None:
    if mel is None:
        return _blank(ax, "audio")
    ax.imshow(mel, origin="lower", aspect="auto", cmap="magma", interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_xlabel(f"{mel.shape[0]} {unit} x {mel.shape[1]} frames", fontsize=7, labelpad=1)


def _text(ax, s: Shown) -> None:
    import textwrap

    ax.axis("off")
    text = "(no text)" if s.text is None else textwrap.shorten(s.text, 90, placeholder="...")
    lines = textwrap.wrap(f"\u201c{text}\u201d" if s.text is not None else text, 34)[:3]
    labels = "  ".join(f"{k}={v}" for k, v in s.labels.items())
    ax.text(0.0, 0.92, s.key, fontsize=9, fontweight="bold", family="monospace", va="top", transform=ax.transAxes)
    ax.text(0.0, 0.68, "\n".join(lines), fontsize=9, va="top", transform=ax.transAxes,
            color="0.5" if s.text is None else "black")
    ax.text(0.0, 0.08, "\n".join(textwrap.wrap(labels, 40)[:2]), fontsize=8, va="bottom", color="tab:red",
            transform=ax.transAxes)


def rejects_table(dataset) -> str:
    """The rejects of a dataset (a path or an open Dataset) as an aligned table, with a count per reason."""
    from .dataset import as_dataset
    from .info import read_rejects, table

    ds = as_dataset(dataset)
    rejects = read_rejects(ds)
    if not rejects:
        return f"no rejects: every one of the {ds.card.counts.get('input', '?')} input records is in the dataset"
    # cells go through info.table, which escapes control characters: ids and messages come from the data
    from collections import Counter

    rows = [[r.get("source_id", "?"), r.get("reason", "?"), _short(r.get("message", ""), 70),
             _short(_joined(r.get("paths", [])), 50)] for r in rejects]
    by_reason = Counter(str(r.get("reason", "?")) for r in rejects)
    lines = table(["source id", "reason", "message", "paths"], rows)
    lines += ["", *table(["reason", "records"], [[k, v] for k, v in sorted(by_reason.items())])]
    return "\n".join(lines)


def _joined(paths: Any) -> str:
    """A reject's ``paths`` as one string (whatever the line holds: rejects.jsonl is not trusted)."""
    return ", ".join(map(str, paths)) if isinstance(paths, list) else str(paths)


def _short(s: str, n: int) -> str:
    s = " ".join(str(s).split())
    return s if len(s) <= n else s[: n - 3] + "..."


def read_augment_config(path: str) -> dict[str, Any]:
    """A YAML/JSON file with an ``augment:`` section, or a bare AugmentConfig mapping."""
    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            d = yaml.safe_load(f) or {}
    except FileNotFoundError:
        raise ConfigError(f"--augment {path!r} does not exist; pass a YAML file with an 'augment:' section") from None
    if not isinstance(d, dict):
        raise ConfigError(f"--augment {path!r} must hold a mapping, got {type(d).__name__}")
    return d.get("augment", d) or {}


# ---- CLI ---------------------------------------------------------------------------------------------------


def add_arguments(p) -> None:
    p.add_argument("dataset", help="dataset folder or fsspec URL")
    p.add_argument("--split", help="split to draw from (default: train, else the first)")
    p.add_argument("-n", type=int, default=8, help="samples to draw (default 8)")
    p.add_argument("--seed", type=int, default=0, help="which samples are drawn, and the augmentation draw")
    p.add_argument("-o", "--output", default="sheet.png", help="PNG to write (default sheet.png)")
    p.add_argument("--augment", metavar="CONFIG", help="YAML with an 'augment:' section: show before and after")
    p.add_argument("--dpi", type=int, default=110)
    p.add_argument("--rejects", action="store_true", help="print the rejects table instead of drawing")
    add_storage_options(p)


def run(args) -> int:
    from .dataset import open_dataset

    ds = open_dataset(args.dataset, storage_options=args.storage_options)
    if args.rejects:
        print(rejects_table(ds))
        return 0
    split = args.split or ("train" if "train" in ds.splits else ds.splits[0])
    augment = read_augment_config(args.augment) if args.augment else None
    fig = contact_sheet(ds, split, n=args.n, seed=args.seed, augment=augment)
    fig.savefig(args.output, dpi=args.dpi)
    if not args.quiet:
        print(f"wrote {args.output}: {len(fig.axes)} panels")
    return 0
