#!/usr/bin/env bash
# On a CUDA machine: the kernel tests compiled (no interpreter), the benchmark
# report, the kernels-vs-twin crossover and the launch-configuration sweep,
# each under a time limit, logs and results under $OUT (default bench/gpu-logs).
# Needs the package importable
# (`pip install --no-deps --no-build-isolation -e .` where torch/triton exist).
set -u -o pipefail
OUT=${OUT:-bench/gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
{ nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/device.txt"
CMIGUARD_TEST_COMPILED=1 CMIGUARD_BACKEND=triton timeout "${TEST_S:-120}" \
  "$PY" -m pytest -q -p no:cacheprovider --durations=5 tests/test_kernels.py \
  tests/test_kernels_compile.py tests/test_decode_graph.py \
  "tests/test_cli.py::test_purify_runs_on_the_device_asked_for" \
  "tests/test_trainer.py::test_training_runs_on_the_teachers_device" \
  2>&1 | tee "$OUT/tests.log"
timeout "${REPORT_S:-170}" "$PY" bench/report.py 2>&1 | tee "$OUT/report.log"
timeout "${CROSS_S:-120}" "$PY" bench/crossover.py --out "$OUT/crossover.json" 2>&1 \
  | tee "$OUT/crossover.log"
timeout "${TUNE_S:-100}" "$PY" bench/tune_blocks.py --out "$OUT/tune_blocks.json" 2>&1 \
  | tee "$OUT/tune.log"
cp bench/results_gpu.* "$OUT/" 2>/dev/null
exit 0
