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
# fusion whose branches train apart, audio weighted half. JOINT trains the fused output instead (equal
# weights); DROP adds modality dropout.
JOINT = ["fused_loss=1", "aux_loss=0", "model.fusion.late_weights=mean"]
DROP = ["augment.mix.modality_dropout=0.3"]
WARP = ["augment.audio.warp_p=0.5", "augment.audio.warp=0.1"]  # vocal tract length perturbation


def MFCC(n: int) -> list[str]:  # noqa: N802 - reads like the constants above
    return [f"augment.audio.cepstra={n}", f"model.audio.n_mels={n}", "augment.audio.freq_mask_bins=3"]


VARIANTS: dict[str, list[str]] = {
    "recipe": [],
    "recipe-equal": ["model.fusion.late_weights=mean"],
    "image-only": ["model.modalities=[image]", *JOINT],
    "audio-only": ["model.modalities=[audio]", *JOINT],
    "audio-only+warp": ["model.modalities=[audio]", *JOINT, *WARP],
    # MFCCs: the first DCT coefficients of the log-mel, without the pitch harmonics
    "audio-only+mfcc20": ["model.modalities=[audio]", *JOINT, *MFCC(20)],
    "audio-only+mfcc13": ["model.modalities=[audio]", *JOINT, *MFCC(13)],
    "audio-only+mfcc20-seed1": ["model.modalities=[audio]", *JOINT, *MFCC(20), "seed=1"],
    "audio-only+mfcc13-seed1": ["model.modalities=[audio]", *JOINT, *MFCC(13), "seed=1"],
    # a second seed of the recipe and of its unimodal references: how much of a gap is seed spread
    "recipe-seed1": ["seed=1"],
    "image-only-seed1": ["model.modalities=[image]", *JOINT, "seed=1"],
    "audio-only-seed1": ["model.modalities=[audio]", *JOINT, "seed=1"],
    "late": [*JOINT],
    "late+drop": [*JOINT, *DROP],
    "late+drop+aux2": [*JOINT, *DROP, "aux_loss=2"],
    "concat": ["model.fusion.name=concat", *JOINT],
    "concat+drop": ["model.fusion.name=concat", *JOINT, *DROP],
    "attention": ["model.fusion.name=attention", *JOINT],
    "attention+drop": ["model.fusion.name=attention", *JOINT, *DROP],
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
    mods = cfg.model.get("modalities") or ["image", "audio"]
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
        for feats in ("image", "audio", "fusion"):
            accs = [base[s][feats] for s in SPEAKERS if s in base]
            parity = [base[s][f"{feats}_parity"] for s in SPEAKERS if f"{feats}_parity" in base.get(s, {})]
            rows.append((f"linear {feats}", "", accs, {s: base[s][feats] for s in SPEAKERS if s in base}, parity))
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
