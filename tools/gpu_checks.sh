#!/usr/bin/env bash
# Every GPU check of issues 6 and 7 in one run on the GPU machine, results under $OUT.
# Here, first:   ../shared/device/wheels.sh kornia kornia-rs safetensors tokenizers
# Then, with the device tool (carry .whl):   bash tools/gpu_checks.sh
set -uo pipefail
OUT=${OUT:-runs/gpu}
mkdir -p "$OUT"
WORK=$(mktemp -d)  # scratch: the machine's temporary folder, whatever it is
python3 -m pip install -q --no-index --no-deps --no-compile --target $WORK/site .whl/*.whl && export PYTHONPATH=$WORK/site:$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/device.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python3 tools/bench_augment.py --device cuda --batch 256 --workers 16 --kornia --decode 2>&1 | tee "$OUT/bench_augment.txt"
python3 tools/bench_loader.py --samples 4096 --workers 16 --batch-size 64 --no-s3 --work $WORK/bl 2>&1 | tail -8 | tee "$OUT/bench_loader.txt"
python3 tools/bench_train_feed.py --device cuda --workers 16 --batch 256 --work $WORK/bl_feed 2>&1 | tail -8 | tee "$OUT/bench_train_feed.txt"
# mtml train on the synthetic 256 px set: samples/s, then a resumed run continues the same curve
python3 tools/bench_loader.py --samples 8192 --shard-samples 512 --workers 16 --runs 1 --no-s3 --work $WORK/syn >/dev/null 2>&1
SET="--set optim.epochs=3 --set data.batch_size=256 --set data.num_workers=16 --set data.image_size=[224,224] \
 --set augment.image.size=[224,224] --set model.image.kind=resnet18 --set data.tasks=[digit] \
 --set model.modalities=[image,audio] --set data.decode_images_on=device --no-progress"
python3 -m mtml_models train --data $WORK/syn/built-synthetic-8192 --config configs/avmnist.yaml --out $WORK/gpu_run $SET 2>&1 | tail -3
python3 -m mtml_models train --data $WORK/syn/built-synthetic-8192 --config configs/avmnist.yaml --out $WORK/gpu_half $SET --stop-after 2 >/dev/null 2>&1
python3 -m mtml_models train --data $WORK/syn/built-synthetic-8192 --out $WORK/gpu_half --resume --no-progress >/dev/null 2>&1
cp $WORK/gpu_run/metrics.csv "$OUT/train_metrics.csv"; cp $WORK/gpu_half/metrics.csv "$OUT/train_resumed_metrics.csv"
echo "results in $OUT"
