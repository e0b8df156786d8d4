"""Mixtures on real data (issue 17): the avmnist recipe trained on two unpaired datasets, tested on a paired unseen speaker.

avmnist-dev has five speakers, 500 folders each; a folder's image and recording were paired at random
by digit. From copies of its folders (nothing is written under the source) this script builds:

  images    image + digit + parity of george's, jackson's and lucas's folders; george's are its test split
  speech    audio + digit + speaker of nicolas's and yweweler's folders: no images
  paired    all of avmnist-dev by speaker: train = the four others, test = george, both modalities
            (the dataset of tools/bench_models.py's george fold)
  repaired  jackson's and lucas's images, each paired with nicolas's or yweweler's recording of the same
            digit and take: the observations of images + speech, now seen together

and trains ``configs/avmnist.yaml`` unchanged (30 epochs; no val split, so the fixed schedule and its
last epoch) three times:

  mixture   --data images --data speech: 1,000 images and 1,000 clips, never in one sample
  repaired  --data repaired: the same images and clips, paired (1,000 samples with both)
  paired    --data paired: paired data of the same four training speakers (2,000 samples with both)

Each run is evaluated on paired's test split, george: a speaker no run has heard, images no run has
seen; whole, and with each modality dropped (``mtml eval --drop-modality``). mixture against
repaired isolates the pairing (same observations); against paired it also has half the images and
two speakers' audio instead of four. Finally ``tools/bench_loader.py --mixture`` measures the
mixture loader against the single-dataset loader in one process.

    OMP_NUM_THREADS=1 python tools/bench_mixture.py --source ../shared/data/avmnist-dev   # ~13 min on 2 cores
    python tools/bench_mixture.py --table                                                   # print what is cached
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SPEAKERS = ("george", "jackson", "lucas", "nicolas", "yweweler")
TEST = "george"
IMAGE_SPEAKERS = ("george", "jackson", "lucas")  # george's folders: images' test split, never trained on
SPEECH_SPEAKERS = ("nicolas", "yweweler")
REPAIRS = (("jackson", "nicolas"), ("lucas", "yweweler"))  # (image folder's speaker, recording's speaker)
TAKES = 50
RUNS = {  # run -> the --data it trains on (names in the work folder)
    "mixture": ["images=images", "speech=speech"],
    "repaired": ["repaired"],
    "paired": ["paired"],
}
DROPS = (None, "audio", "image")


def _copy(dst: Path, files: dict[str, Path], labels: dict) -> None:
    dst.mkdir(parents=True)
    for name, src in files.items():
        shutil.copyfile(src, dst / name)
    (dst / "labels.json").write_text(json.dumps(labels))


def write_raw(source: Path, raw: Path) -> None:
    """Copy the chosen files of the chosen folders into raw/{images,speech,repaired}/SPLIT/ID."""
    if (raw / "done").is_file():
        return
    shutil.rmtree(raw, ignore_errors=True)
    for digit in range(10):
        parity = "even" if digit % 2 == 0 else "odd"
        for take in range(TAKES):
            for spk in IMAGE_SPEAKERS:
                sid = f"{digit}_{spk}_{take}"
                split = "test" if spk == TEST else "train"
                _copy(raw / "images" / split / sid, {"image.png": source / sid / "image.png"},
                      {"digit": digit, "parity": parity})
            for spk in SPEECH_SPEAKERS:
                sid = f"{digit}_{spk}_{take}"
                _copy(raw / "speech" / "train" / sid, {"audio.wav": source / sid / "audio.wav"},
                      {"digit": digit, "speaker": spk})
            for img, aud in REPAIRS:
                _copy(raw / "repaired" / "train" / f"{digit}_{img}+{aud}_{take}",
                      {"image.png": source / f"{digit}_{img}_{take}" / "image.png",
                       "audio.wav": source / f"{digit}_{aud}_{take}" / "audio.wav"},
                      {"digit": digit, "parity": parity, "speaker": aud})
    (raw / "done").write_text("")


def build_all(source: Path, work: Path) -> None:
    from mmdata.build import BuildConfig, build_dataset

    write_raw(source, work / "raw")
    for name in ("images", "speech", "repaired"):
        if not (work / name / "dataset.json").is_file():
            print(f"mmdata build {work / 'raw' / name} {work / name}", flush=True)
            build_dataset(work / "raw" / name, work / name, BuildConfig.from_dict({}), overwrite=True, progress=False)
    if not (work / "paired" / "dataset.json").is_file():
        print(f"mmdata build {source / 'manifest.csv'} {work / 'paired'} --split-by speaker --test-groups {TEST}",
              flush=True)
        cfg = BuildConfig.from_dict({"split_by": "speaker", "test_groups": [TEST]})
        build_dataset(source / "manifest.csv", work / "paired", cfg, overwrite=True, progress=False)


def run_one(name: str, work: Path, epochs: int | None) -> dict:
    """Train run ``name`` (unless its result is cached) and evaluate it on paired's test split."""
    from mtml_models.cli import main as mtml
    from mtml_models.evaluate import evaluate_run

    cached = work / "results" / f"{name}.json"
    if cached.is_file():
        return json.loads(cached.read_text())
    data = [d.replace("=", f"={work}/", 1) if "=" in d else str(work / d) for d in RUNS[name]]
    out = work / "runs" / name
    shutil.rmtree(out, ignore_errors=True)
    args = ["train", *[a for d in data for a in ("--data", d)], "--config", str(ROOT / "configs/avmnist.yaml"),
            "--out", str(out), "--no-progress", "-q"]
    if epochs:
        args += ["--set", f"optim.epochs={epochs}"]
    print("mtml " + " ".join(args), flush=True)
    t0 = time.perf_counter()
    if mtml(args) != 0:
        raise SystemExit(f"training {name} failed")
    seconds = time.perf_counter() - t0
    result = {"run": name, "train_seconds": round(seconds, 1), "data": RUNS[name], "eval": {}}
    config = json.loads((out / "config.json").read_text())
    result["branch_tasks"] = config["model"]["fusion"]["branch_tasks"]
    for drop in DROPS:
        print(f"mtml eval --run {out} --data {work / 'paired'} --split test --checkpoint last"
              + (f" --drop-modality {drop}" if drop else ""), flush=True)
        r = evaluate_run(out, str(work / "paired"), "test", drop_modality=drop, checkpoint="last")
        result["eval"][drop or "none"] = {t: ms["accuracy"] for t, ms in r["tasks"].items()}
        result["test_samples"] = r["samples"]
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps(result, indent=2))
    return result


def table(results: list[dict]) -> str:
    head = ("| run | trains on | digit fused | digit, audio dropped | digit, image dropped | parity fused | "
            "parity, audio dropped | parity, image dropped | train s |")
    lines = [head, "|" + "---|" * 9]
    for r in results:
        e = r["eval"]
        no_parity = r["branch_tasks"] is not None and "parity" not in r["branch_tasks"].get("audio", ["parity"])
        alone = "n/a*" if no_parity else f"{e['image']['parity']:.3f}"
        lines.append(f"| {r['run']} | {' + '.join(d.split('=')[0] for d in r['data'])} | {e['none']['digit']:.3f} | "
                     f"{e['audio']['digit']:.3f} | {e['image']['digit']:.3f} | {e['none']['parity']:.3f} | "
                     f"{e['audio']['parity']:.3f} | {alone} | {r['train_seconds']:.0f} |")
    return "\n".join(lines)


def loader_ratio(source: Path, runs: int) -> str:
    """Run tools/bench_loader.py --mixture on avmnist-dev: its table and ratio lines."""
    cmd = [sys.executable, str(ROOT / "tools/bench_loader.py"), "--mixture", "--no-s3", "--source", str(source),
           "--image-size", "28", "--shard-samples", "256", "--workers", "2", "--runs", str(runs)]
    print(" ".join(["python", *cmd[1:]]), flush=True)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return out.strip()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--source", default=str(ROOT.parent / "shared/data/avmnist-dev"), help="avmnist-dev folder")
    p.add_argument("--work", default=str(ROOT / "runs/bench_mixture"), help="datasets, runs and cached results")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--epochs", type=int, help="override optim.epochs (a smoke test; the table is for the recipe's 30)")
    p.add_argument("--loader-runs", type=int, default=3, help="epochs per row of bench_loader (0 skips it)")
    p.add_argument("--table", action="store_true", help="print the cached results only")
    args = p.parse_args()
    source, work = Path(args.source), Path(args.work)
    if not args.table:
        build_all(source, work)
    results = []
    for name in args.runs:
        cached = work / "results" / f"{name}.json"
        if args.table and not cached.is_file():
            continue
        results.append(run_one(name, work, args.epochs))
    print(f"\ntest: {TEST}, {results[0]['test_samples'] if results else '?'} paired samples; accuracy\n")
    print(table(results))
    if any(r["branch_tasks"] for r in results):
        print("\n* no source pairs audio with parity: the audio branch has no parity head "
              f"(model.fusion.branch_tasks = {next(r['branch_tasks'] for r in results if r['branch_tasks'])})")
    if args.loader_runs and not args.table:
        print("\n" + loader_ratio(source, args.loader_runs))  # its last line: ratio ours-mix / ours
    return 0


if __name__ == "__main__":
    sys.exit(main())
