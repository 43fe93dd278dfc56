#!/usr/bin/env bash
# Everything that needs a GPU, in one command (device time is billed by the minute): the test suites on
# CUDA (Triton against the torch path, compiled), the kernels' launch parameters, the image processors'
# speed, the CLIP ViT-L/14 harvest rate, the train-step table at the H100 shape and `saex train` end to
# end against its bare step. Results go to $OUT
# (the device tool's folder) or ./gpu-results. Name steps to run a subset (default: all of them).
#
#   here:        bash scripts/gpu_wheels.sh        # once: SAELens, sparsify and their deps into .whl/
#   device run:  bash benchmarks/gpu_session.sh [tests] [kernels] [preprocess] [harvest] [train] [loop]
#                (carry [".whl"])
#   PYTEST_ARGS (default: the GPU-relevant suites), KERNELS_ARGS (e.g. --only topk), HARVEST_WORKERS (default
#   "-1 15") and PROFILE (train-step rows to profile) adjust steps.
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
steps=${*:-tests kernels preprocess harvest train loop}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
for step in $steps; do
  echo "== $step $(date +%T)"
  case $step in
    tests)  # suites needing Debian's or PyPI's embedded datasets fail there for want of them
      timeout 300 python3 -m pytest -q -p no:cacheprovider --timeout 120 --tb=short \
        ${PYTEST_ARGS:-tests/sae tests/train tests/models tests/test_harvest.py} > "$out/pytest.txt" 2>&1
      tail -15 "$out/pytest.txt" ;;
    kernels) python3 benchmarks/kernels.py ${KERNELS_ARGS:-} > "$out/kernels.json" ;;
    preprocess) python3 benchmarks/preprocess.py | tee "$out/preprocess.json" ;;
    harvest)
      for workers in ${HARVEST_WORKERS:--1 15}; do
        python3 benchmarks/harvest.py --images ${HARVEST_IMAGES:-32768} --workers $workers 2>/dev/null | tee -a "$out/harvest.json"
      done ;;
    loop) python3 benchmarks/train_loop.py --shape h100 | tee "$out/train_loop.json" ;;
    train)
      python3 benchmarks/train_step.py --shape h100 --profile "${PROFILE:-saex topk}" > "$out/train_step.json" \
        2> "$out/train_step.err"
      cat "$out/train_step.json" ;;
  esac
done
