#!/usr/bin/env bash
# The checks no CPU run can do, for a machine with a CUDA GPU (the `device` tool's, when one is lent):
# the test suite on a CUDA machine (the bundle and Predictor paths pick the GPU; most unit tests build CPU
# tensors), two epochs of bundle training with AMP for the 1/4 recipe (fast_cpu.json) and the native one
# (native_cpu.json), evaluate and predict with the cached decoder under CUDA autocast (the configs' `amp`,
# on by default where CUDA is), and the benchmark (its timings are CPU figures; it is run to show the
# package works there). CI never runs this: it needs a GPU.
#
# Usage, from the repository root:
#   bash scripts/cuda_checks.sh [OUTPUT_DIR [STEP ...]]   (default runs/cuda_checks, every step)
# STEP: tests train_quarter train_native evaluate predict benchmark; evaluate and predict need the trainings.
# A call of the device tool has 10 minutes: give it a few steps at a time. Each step's output is also in
# OUTPUT_DIR/<step>.log.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/cuda_checks}
shift || true
STEPS=${*:-tests train_quarter train_native evaluate predict benchmark}
mkdir -p "$OUT"

python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'no CUDA device: these checks need a GPU')"
python -c "import torch, monai; print('torch', torch.__version__, 'CUDA', torch.version.cuda, torch.cuda.get_device_name(0), 'monai', monai.__version__)"

log() {  # log NAME COMMAND...: run, keep the log, print the wall time; the script stops at the first failure
    local name=$1 start=$SECONDS
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: $((SECONDS - start)) s"
}

train() {  # train NAME RECIPE_CONFIG: two epochs on the demo data, AMP on, from scratch
    local root="$OUT/$1"
    rm -rf "$root/models"  # a rerun trains again instead of resuming a finished run
    log "$1" python -m monai.bundle run training --meta_file bundle/configs/metadata.json \
        --config_file "['bundle/configs/train.json','bundle/configs/$2','bundle/configs/demo.json']" \
        --logging_file bundle/configs/logging.conf --bundle_root "$root" --max_epochs 2 --val_interval 1 --amp True
}

for step in $STEPS; do
    case $step in
        tests) log tests python -m pytest -q ;;
        train_quarter) train train_quarter fast_cpu.json ;;
        train_native) train train_native native_cpu.json ;;
        evaluate)
            demo="$OUT/train_quarter/data/demo"
            log evaluate_shipped python -m sppnet_monai evaluate "$demo" --output_dir "$OUT/eval_shipped" --protocol automatic
            for run in train_quarter train_native; do
                log "evaluate_$run" python -m sppnet_monai evaluate "$demo" --output_dir "$OUT/eval_$run" \
                    --checkpoint "$OUT/$run/models/model.pt" --protocol prompted
            done
            ;;
        predict)
            for run in train_quarter train_native; do
                log "predict_$run" python -m sppnet_monai predict "$OUT/train_quarter/data/demo/images" "$OUT/predictions_$run" \
                    --checkpoint "$OUT/$run/models/model.pt"
            done
            ;;
        benchmark) log benchmark python -m sppnet_monai benchmark ;;
        *) echo "unknown step $step (steps: tests train_quarter train_native evaluate predict benchmark)" >&2; exit 2 ;;
    esac
done
