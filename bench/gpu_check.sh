#!/usr/bin/env bash
# GPU validation of fastalpha in one go, for a GPU machine lent for minutes:
#
#     bash bench/gpu_check.sh OUTDIR
#
# Needs only what is already installed (torch + triton, e.g. torch 2.11 / triton 3.6); no pip,
# no network. Steps, each with its own time limit and log in OUTDIR, each run even if an
# earlier one failed:
#   1. env        versions, GPU, fastalpha.available_backends()             env.txt
#   2. tests      pytest -m gpu (GPU-marked tests, M up to 65536)           tests.log, tests.xml
#   3. bench      python bench/compare.py --device cuda --quick              bench.log, bench/
#   4. roofline   the roofline model's predictions (docs/roofline.md) next to timings of the
#                 same cases: fused triton, chunked, dense eager at M = 16384, 65536, D = 128,
#                 bf16 and tf32 (bench.static.roofline --measure)   roofline.log, .csv
#   5. train      python train/run.py --check-eager 20 (fused vs eager)      train.log, train/
# and a summary (summary.txt, also printed) that ends with the roofline table, so the first GPU
# run says at once how far off the model was. Exit status 0 only if every step passed.
# Limits (seconds) can be changed with GPU_CHECK_TESTS_S, GPU_CHECK_BENCH_S, GPU_CHECK_ROOFLINE_S,
# GPU_CHECK_TRAIN_S; their defaults add up to 8 minutes. Exit status: 0 every step passed, 1 a step failed or
# timed out, 3 no CUDA device (steps 3-4 skipped, step 2 reports the GPU tests as skipped).
#
# Fashion-MNIST for step 4 is looked up under DATA_ROOT (default ./data) and in Debian's
# /usr/share/datasets/fashion-mnist; where it is absent the step trains on the synthetic set
# instead and the summary says so (GPU_CHECK_DATASET overrides the choice).
set -u -o pipefail

if [ $# -ne 1 ]; then
  echo "usage: bash bench/gpu_check.sh OUTDIR" >&2
  exit 2
fi
REPO=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
OUTDIR=$(cd "$1" && pwd)
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
TESTS_S=${GPU_CHECK_TESTS_S:-180}
BENCH_S=${GPU_CHECK_BENCH_S:-100}
ROOFLINE_S=${GPU_CHECK_ROOFLINE_S:-90}
TRAIN_S=${GPU_CHECK_TRAIN_S:-70}
DATA_ROOT=${DATA_ROOT:-$REPO/data}
STARTED=$(date +%s)
SUMMARY=()

# run_step NAME LIMIT_S LOG COMMAND...: SIGINT at the limit (pytest then still writes its
# report), SIGKILL 20 s later; records "name status seconds log".
run_step() {
  local name=$1 limit=$2 log=$3 start rc status
  shift 3
  echo "== $name (limit ${limit}s): $*"
  start=$(date +%s)
  timeout -s INT -k 20 "$limit" "$@" >"$log" 2>&1
  rc=$?
  case $rc in
    0) status=ok ;;
    124|130|137) status="TIMEOUT after ${limit}s" ;;
    *) status="FAILED (exit $rc)" ;;
  esac
  SUMMARY+=("$(printf '%-6s %-24s %4ss  %s' "$name" "$status" "$(($(date +%s) - start))" "$log")")
  echo "   $status; last lines of $log:"
  tail -n 5 "$log" | sed 's/^/   | /'
}

skip_step() {
  SUMMARY+=("$(printf '%-6s %-24s %4ss  %s' "$1" "SKIPPED" 0 "$2")")
  echo "== $1 skipped: $2"
}

run_step env 60 "$OUTDIR/env.txt" bash -c "
  date -u; uname -a; nvidia-smi || echo 'nvidia-smi: not available'
  $PY - <<'EOF'
import torch, triton, fastalpha
print('python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| triton', triton.__version__)
print('cuda', torch.version.cuda, '| device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'none')
for name, (ok, why) in fastalpha.available_backends().items():
    print(f'backend {name:7s} {\"yes\" if ok else \"no \"} {why}')
EOF"

if $PY -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  HAS_CUDA=1
else
  HAS_CUDA=0
  echo "!! no CUDA device: GPU tests will be reported skipped, bench and train steps are skipped"
fi

# A test module that fails to import must not cost the GPU tests of the others (the step still
# reports the error).
run_step tests "$TESTS_S" "$OUTDIR/tests.log" \
  "$PY" -m pytest -m gpu tests -q -rfEs -p no:cacheprovider --continue-on-collection-errors \
    --junitxml="$OUTDIR/tests.xml" --durations=15

if [ "$HAS_CUDA" = 1 ]; then
  run_step bench "$BENCH_S" "$OUTDIR/bench.log" \
    "$PY" bench/compare.py --device cuda --quick --out "$OUTDIR/bench"

  # The timings stop after 60 s of measuring (a dense eager case that does not fit in memory is
  # reported as such); the step limit leaves room for compiling and autotuning the kernels.
  run_step roofline "$ROOFLINE_S" "$OUTDIR/roofline.log" \
    "$PY" -m bench.static.roofline --measure --budget 60 --csv "$OUTDIR/roofline.csv"

  DATASET=${GPU_CHECK_DATASET:-}
  BATCH=1024
  if [ -z "$DATASET" ]; then
    if ls "$DATA_ROOT"/FashionMNIST/raw/train-images-idx3-ubyte* "$DATA_ROOT"/fashion-mnist/train-images-idx3-ubyte* \
         /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte* >/dev/null 2>&1; then
      DATASET=fashion-mnist
    else
      DATASET=synthetic
      BATCH=32  # the synthetic set is tiny: a batch of 1024 would not fit in it
      echo "!! Fashion-MNIST not found under $DATA_ROOT or /usr/share/datasets/fashion-mnist: train check uses --dataset synthetic"
    fi
  fi
  run_step train "$TRAIN_S" "$OUTDIR/train.log" \
    "$PY" train/run.py --check-eager 20 --dataset "$DATASET" --arch resnet18 --batch "$BATCH" \
      --data-root "$DATA_ROOT" --device cuda --backend triton --out "$OUTDIR/train" --no-progress
  SUMMARY+=("       (train check dataset: $DATASET)")
else
  skip_step bench "no CUDA device"
  run_step roofline 120 "$OUTDIR/roofline.log" "$PY" -m bench.static.roofline --csv "$OUTDIR/roofline.csv"
  skip_step train "no CUDA device"
fi

{
  echo "fastalpha gpu_check: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $(($(date +%s) - STARTED)) s in all, outputs in $OUTDIR"
  printf '%s\n' "${SUMMARY[@]}"
  echo "tests: $(grep -E '(passed|failed|skipped|error|no tests ran)' "$OUTDIR/tests.log" | tail -n 1)"
  if grep -q '^roofline model' "$OUTDIR/roofline.log" 2>/dev/null; then
    echo "roofline (predicted = perfect overlap - no overlap of the units; measured/upper < 1 beats the serial bound):"
    sed -n '/^roofline model/,$p' "$OUTDIR/roofline.log"
  fi
} | tee "$OUTDIR/summary.txt"

if grep -qE 'FAILED|TIMEOUT' "$OUTDIR/summary.txt"; then
  exit 1
fi
if [ "$HAS_CUDA" = 0 ]; then
  echo "nothing was validated on a GPU (no CUDA device)"
  exit 3
fi
exit 0
