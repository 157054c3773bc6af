#!/bin/bash
# GPU checks on GroceryStore, as run on a lent NVIDIA H200 (results: benchmarks/GPU.md, logs: benchmarks/gpu/).
# Usage: benchmarks/gpu_check.sh GROCERY_DIR OUT_DIR   (fruitlens importable, MobileNetV2 weights in the torch cache)
# Call 1: the default recipe, then fine-tuning 3, 6 and all 19 blocks on top of it (image path, 16-mixed), each with
# the test accuracy of its fine-tune checkpoints (eval_finetune.py); then the training tests on the GPU.
# Call 2: the default recipe at 448 px (seed 1) and at 576 px (seeds 0-2).
set -u
DATA=$1 OUT=$2; mkdir -p "$OUT"; export PYTHONUNBUFFERED=1
HERE=$(cd "$(dirname "$0")" && pwd)
run() {  # name, args...
  local name=$1; shift; local t=$(date +%s)
  timeout 300 python3 -m fruitlens train "$DATA" --out /tmp/fruitlens-gpu/$name --workers 12 --target-acc 0 "$@" \
    > "$OUT/$name.log" 2>&1
  echo "== $name rc=$? $(( $(date +%s) - t )) s"
  grep -E "test accuracy|did not improve|features:|\[fine-tune\] epoch|rror" "$OUT/$name.log" | tail -14
  [ -d /tmp/fruitlens-gpu/$name/checkpoints/fine-tune ] && python3 "$HERE/eval_finetune.py" /tmp/fruitlens-gpu/$name
  cp /tmp/fruitlens-gpu/$name/history.csv "$OUT/$name.history.csv" 2>/dev/null
}
rm -rf /tmp/fruitlens-gpu
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
run default --cache-images
run ft3 --cache-images --fine-tune-blocks 3 --fine-tune-epochs 8
run ftall --cache-images --fine-tune-blocks 19 --fine-tune-epochs 8 fit.fine_tune_lr=3e-5
run ft6 --cache-images --fine-tune-blocks 6 --fine-tune-epochs 8
python3 -m pytest -x -q -p no:cacheprovider "$HERE/../tests/test_training.py" "$HERE/../tests/test_data_images.py" | tail -3
run s448_1 --seed 1
for s in 0 1 2; do run s576_$s --img-size 576 --seed $s; done
