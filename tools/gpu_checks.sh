#!/usr/bin/env bash
# Every GPU check of issues 6, 7 and 20 in one run on the GPU machine; every output in a file under $OUT.
# Expected run time on the H200 machine: about 4 to 6 minutes, well under the device tool's 10 (an estimate
# from the steps' sizes, not yet timed there; each step also has its own cap). One synthetic set of 3072
# samples with a val split is built once (about a minute) and reused by the loader bench, the train-feed
# bench and the training runs. A failed step shows the end of its log; the script exits non-zero.
# Here, first:   ../shared/device/wheels.sh kornia kornia-rs safetensors tokenizers
# Then, with the device tool (carry .whl):   bash tools/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if ! compgen -G ".whl/*.whl" >/dev/null; then
  echo "gpu_checks.sh: no wheels in $PWD/.whl/ (webdataset, soundfile, ... that the GPU machine lacks)." >&2
  echo "  Make them on this side with ../shared/device/wheels.sh kornia kornia-rs safetensors tokenizers," >&2
  echo "  then run this script with the device tool, carrying .whl." >&2
  exit 2
fi
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
WORK=$(mktemp -d)  # scratch: the machine's temporary folder, whatever it is
trap 'rm -rf "$WORK"' EXIT
SAMPLES=3072
DATA=$WORK/syn/built-synthetic-$SAMPLES  # the name tools/bench_loader.py looks for under --work
FAILED=()

run() {  # run NAME SECONDS CMD...: CMD's whole output goes to $OUT/NAME.txt; a failure shows its end
  local name=$1 limit=$2 rc=0 t0=$SECONDS
  shift 2
  echo "== $name: $*"
  timeout "$limit" "$@" >"$OUT/$name.txt" 2>&1 || rc=$?
  if ((rc != 0)); then
    tail -n 25 "$OUT/$name.txt"
    echo "!! $name failed (exit $rc$( ((rc == 124)) && echo ", over its ${limit} s"), $((SECONDS - t0)) s); log: $OUT/$name.txt"
    FAILED+=("$name")
    return 1
  fi
  tail -n 6 "$OUT/$name.txt"
  echo "   ($((SECONDS - t0)) s)"
}
need() { run "$@" || { echo "gpu_checks.sh: stopping, later steps need $1" >&2; exit 1; }; }
check() { run "$@" || true; }  # independent: note the failure, go on, exit non-zero at the end
# (``run`` itself in an ``if``/``&&`` chain: a failure is noted there too, and the chain stops)

need install 120 python3 -m pip install -q --no-index --no-deps --no-compile --target "$WORK/site" .whl/*.whl
export PYTHONPATH=$WORK/site:$PWD
need versions 60 bash -c 'nvidia-smi --query-gpu=name,memory.total --format=csv && python3 -c "
import sys, torch, torchvision, torchaudio; print(sys.version); print(torch.__version__, torch.version.cuda,
torchvision.__version__, torchaudio.__version__, torch.cuda.get_device_name())"'
check gpu_tests 180 python3 -m pytest -q -m gpu -p no:cacheprovider
check bench_augment 120 python3 tools/bench_augment.py --device cuda --batch 256 --workers 16 --kornia --decode

# the synthetic set, once: 256 px JPEG + 1 s FLAC + text + digit, 10 % of it a val split
need synthetic 120 python3 -c "import sys; from pathlib import Path; sys.path.insert(0, 'tools')
from bench_loader import make_synthetic; make_synthetic(Path('$WORK/syn/raw'), $SAMPLES)"
need build 120 python3 -m mmdata build "$WORK/syn/raw/manifest.csv" "$DATA" --val 0.1 --max-samples 256 --no-progress
ln -s "$DATA" "$WORK/syn/ds"  # the name tools/bench_train_feed.py looks for under --work
check bench_loader 120 python3 tools/bench_loader.py --samples $SAMPLES --workers 16 --batch-size 64 --runs 2 \
  --no-s3 --work "$WORK/syn"
check bench_train_feed 180 python3 tools/bench_train_feed.py --device cuda --workers 16 --batch 256 \
  --samples $SAMPLES --work "$WORK/syn"

# mtml train with validation each epoch: samples/s, then a run stopped after 2 epochs and resumed
SET=(--set optim.epochs=3 --set data.batch_size=256 --set data.num_workers=16 --set "data.image_size=[224,224]"
     --set "augment.image.size=[224,224]" --set model.image.kind=resnet18 --set "data.tasks=[digit]"
     --set "model.modalities=[image,audio]" --set data.decode_images_on=device --no-progress)
TRAIN=(python3 -m mtml_models train --data "$DATA")
if run train 180 "${TRAIN[@]}" --config configs/avmnist.yaml --out "$WORK/gpu_run" "${SET[@]}" &&
   run train_half 150 "${TRAIN[@]}" --config configs/avmnist.yaml --out "$WORK/gpu_half" "${SET[@]}" --stop-after 2 &&
   run train_resume 120 "${TRAIN[@]}" --out "$WORK/gpu_half" --resume --no-progress; then
  cp "$WORK/gpu_run/metrics.csv" "$OUT/train_metrics.csv"
  cp "$WORK/gpu_half/metrics.csv" "$OUT/train_resumed_metrics.csv"
  # cuDNN's kernels are not deterministic, so the resumed curve matches the uninterrupted one only within
  # a tolerance: |a - b| <= 0.02 + 0.02 |a| for every column but samples_per_s (a timing) and score (Δm, a
  # relative change against epoch 1's val metrics, which magnifies their differences near chance level)
  check resume_compare 60 python3 - "$OUT/train_metrics.csv" "$OUT/train_resumed_metrics.csv" <<'PY'
import csv, sys
a, b = ([dict(r) for r in csv.DictReader(open(p))] for p in sys.argv[1:3])
assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == ["1", "2", "3"], "both runs must log epochs 1-3"
assert any(k.startswith("val_") for k in a[0]), f"no val_ column: validation did not run ({list(a[0])})"
bad = []
for k in a[0]:
    if k in ("epoch", "samples_per_s"):
        continue
    diff = max(abs(float(x[k]) - float(y[k])) for x, y in zip(a, b))
    ok = k == "score" or all(abs(float(x[k]) - float(y[k])) <= 0.02 + 0.02 * abs(float(x[k])) for x, y in zip(a, b))
    print(f"{k:32s} max |uninterrupted - resumed| = {diff:.4g}{'' if ok else '   OUT OF TOLERANCE'}")
    bad += [] if ok else [k]
sys.exit(f"resumed run differs beyond tolerance in {bad}" if bad else 0)
PY
fi

echo "results in $OUT"
if ((${#FAILED[@]})); then
  echo "gpu_checks.sh: FAILED: ${FAILED[*]}" >&2
  exit 1
fi
