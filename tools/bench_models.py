"""Leave-one-speaker-out digit accuracy of the reference models on avmnist-dev, next to linear baselines.

For each held-out speaker (fold) it builds the dataset once (train = the other four speakers, test =
the held-out one, no val: the recipe's fixed schedule), trains every variant from
``configs/avmnist.yaml`` with a few overrides, and evaluates it whole and with each modality dropped.
Results are cached per (variant, fold) under ``--work`` so the sweep can be resumed or extended.

    python tools/bench_models.py --source ../shared/data/avmnist-dev            # everything (hours on a CPU)
    python tools/bench_models.py --variants recipe --folds george jackson        # a slice
    python tools/bench_models.py --table                                         # print what is cached
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "yweweler")

# variant -> --set overrides on configs/avmnist.yaml. "recipe" is the shipped config unchanged: late
# fusion whose branches train apart, audio weighted half, audio as 13 MFCCs. JOINT trains the fused
# output instead (equal weights); DROP adds modality dropout; LOGMEL gives the audio branch the 40-band
# log-mel of the previous recipe instead of MFCCs (the audio encoder's input bins follow augment.audio).
JOINT = ["fused_loss=1", "aux_loss=0", "model.fusion.late_weights=mean"]
DROP = ["augment.mix.modality_dropout=0.3"]
LOGMEL = ["augment.audio.cepstra=0", "augment.audio.freq_mask_bins=6"]
WARP = ["augment.audio.warp_p=0.5", "augment.audio.warp=0.1"]  # vocal tract length perturbation (mel bands)
AUDIO, IMAGE = "model.modalities=[audio]", "model.modalities=[image]"
VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "recipe-equal": ["model.fusion.late_weights=mean"],
    "image-only": [IMAGE, *JOINT],
    "audio-only": [AUDIO, *JOINT],
    "audio-only+mfcc20": [AUDIO, *JOINT, "augment.audio.cepstra=20"],
    # a second seed of the recipe and of its unimodal references: how much of a gap is seed spread
    "recipe-seed1": ["seed=1"],
    "image-only-seed1": [IMAGE, *JOINT, "seed=1"],
    "audio-only-seed1": [AUDIO, *JOINT, "seed=1"],
    "audio-only+mfcc20-seed1": [AUDIO, *JOINT, "augment.audio.cepstra=20", "seed=1"],
    "late": [*JOINT],
    "late+drop": [*JOINT, *DROP],
    "concat": ["model.fusion.name=concat", *JOINT],
    "concat+drop": ["model.fusion.name=concat", *JOINT, *DROP],
    "attention": ["model.fusion.name=attention", *JOINT],
    "attention+drop": ["model.fusion.name=attention", *JOINT, *DROP],
    # the same on the log-mel audio features of the previous recipe
    "recipe-logmel": [*LOGMEL],
    "recipe-logmel-equal": ["model.fusion.late_weights=mean", *LOGMEL],
    "recipe-logmel-seed1": [*LOGMEL, "seed=1"],
    "audio-only-logmel": [AUDIO, *JOINT, *LOGMEL],
    "audio-only-logmel-seed1": [AUDIO, *JOINT, *LOGMEL, "seed=1"],
    "audio-only-logmel+warp": [AUDIO, *JOINT, *LOGMEL, *WARP],
    "late-logmel": [*JOINT, *LOGMEL],
    "late-logmel+drop": [*JOINT, *LOGMEL, *DROP],
    "late-logmel+drop+aux2": [*JOINT, *LOGMEL, *DROP, "aux_loss=2"],
    "concat-logmel": ["model.fusion.name=concat", *JOINT, *LOGMEL],
    "concat-logmel+drop": ["model.fusion.name=concat", *JOINT, *LOGMEL, *DROP],
    "attention-logmel": ["model.fusion.name=attention", *JOINT, *LOGMEL],
    "attention-logmel+drop": ["model.fusion.name=attention", *JOINT, *LOGMEL, *DROP],
}


def build_fold(source: Path, work: Path, speaker: str) -> Path:
    from mmdata.build import BuildConfig, build_dataset

    out = work / "data" / speaker
    if not (out / "dataset.json").is_file():
        cfg = BuildConfig.from_dict({"split_by": "speaker", "test_groups": [speaker], "val": 0.0, "test": 0.0})
        build_dataset(source / "manifest.csv", out, cfg, overwrite=True, progress=False)
    return out


def run_one(variant: str, speaker: str, data: Path, work: Path, extra: list[str]) -> dict:
    from mtml_models.config import load_config
    from mtml_models.evaluate import evaluate_run
    from mtml_models.train import train

    run = work / "runs" / f"{variant}-{speaker}"
    cfg = load_config(ROOT / "configs/avmnist.yaml", [*VARIANTS[variant], *extra])
    t0 = time.perf_counter()
    train(cfg, str(data), run, progress=False)
    seconds = time.perf_counter() - t0
    mods = cfg.model.modalities
    result = {"variant": variant, "fold": speaker, "train_seconds": round(seconds, 1), "overrides": VARIANTS[variant] + extra}
    for dropped in [None, *(m for m in mods if len(mods) > 1)]:
        r = evaluate_run(run, str(data), "test", drop_modality=dropped, checkpoint="last")
        result[f"drop-{dropped or 'none'}"] = {t: ms["accuracy"] for t, ms in r["tasks"].items()}
    return result


def table(work: Path) -> str:
    rows = []
    baselines = ROOT / "runs" / "baselines.json"
    if baselines.is_file():
        base = json.loads(baselines.read_text())
        for feats in ("image", "audio", "audio_mfcc13", "fusion"):
            if not all(feats in base.get(s, {}) for s in SPEAKERS):
                continue
            accs = [base[s][feats] for s in SPEAKERS if s in base]
            parity = [base[s][f"{feats}_parity"] for s in SPEAKERS if f"{feats}_parity" in base.get(s, {})]
            rows.append((f"linear {feats.replace('_', ' ')}", "", accs, {s: base[s][feats] for s in SPEAKERS if s in base}, parity))
    for variant in VARIANTS:
        results = {s: json.loads(p.read_text()) for s in SPEAKERS
                   if (p := work / "results" / f"{variant}-{s}.json").is_file()}
        if not results:
            continue
        for dropped in ("none", "audio", "image"):
            key = f"drop-{dropped}"
            per = {s: r[key]["digit"] for s, r in results.items() if key in r}
            parity = [r[key]["parity"] for r in results.values() if key in r and "parity" in r[key]]
            if per:
                rows.append((variant, "" if dropped == "none" else f"{dropped} dropped", list(per.values()), per,
                             parity))
    lines = ["| model | input | digit mean | std | min | " + " | ".join(SPEAKERS) + " | parity mean |",
             "|---|---|---|---|---|" + "---|" * (len(SPEAKERS) + 1)]
    for name, inp, accs, per, parity in rows:
        sd = statistics.pstdev(accs) if len(accs) > 1 else 0.0
        cells = " | ".join(f"{per[s]:.3f}" if s in per else "–" for s in SPEAKERS)
        par = f"{statistics.mean(parity):.3f}" if parity else "–"
        lines.append(f"| {name} | {inp} | {statistics.mean(accs):.3f} | {sd:.3f} | {min(accs):.3f} | {cells} | {par} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=ROOT.parent / "shared/data/avmnist-dev")
    ap.add_argument("--work", type=Path, default=ROOT / "runs/bench_models")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--folds", nargs="+", default=list(SPEAKERS), choices=SPEAKERS)
    ap.add_argument("--set", action="append", default=[], help="extra override for every variant")
    ap.add_argument("--table", action="store_true", help="only print the table of cached results")
    args = ap.parse_args()
    if not args.table:
        (args.work / "results").mkdir(parents=True, exist_ok=True)
        for variant in args.variants:
            for speaker in args.folds:
                path = args.work / "results" / f"{variant}-{speaker}.json"
                if path.is_file():
                    continue
                data = build_fold(args.source, args.work, speaker)
                result = run_one(variant, speaker, data, args.work, args.set)
                path.write_text(json.dumps(result, indent=2))
                print(json.dumps(result), flush=True)
    print(table(args.work))


if __name__ == "__main__":
    main()
