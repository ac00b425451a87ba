#!/usr/bin/env bash
# On a CUDA machine: the kernel tests compiled (no interpreter), the benchmark
# report, the kernels-vs-twin crossover and the launch-configuration sweep,
# each under a time limit (about 9 min in all). Under $OUT (default
# bench/gpu-logs) six files: gpu.log (the device, then each step's output),
# crossover.json, tune_blocks.json and results_gpu.{md,json,png}; the device
# tool brings back at most eight. Installs the package (--no-deps: the GPU
# image has torch, triton and transformers, and no network) if it is not
# importable, or links it where pip cannot; the image lacks the serve extra
# (pydantic, fastapi), which these steps do not import.
set -u -o pipefail
OUT=${OUT:-bench/gpu-logs}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() { echo; echo "=== $1 ($(date -u +%H:%M:%S) UTC)"; }
# if pip cannot install it (no build backend on the image, say), the package
# needs no build: engine/ is cmiguard and ops/ is cmiguard.kernels (pyproject.toml)
link_package() {
  local site
  site=$(mktemp -d)
  mkdir -p "$site/cmiguard" && ln -s "$PWD"/engine/* "$site/cmiguard/" \
    && ln -s "$PWD/ops" "$site/cmiguard/kernels" \
    && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}" \
    && "$PY" -c "import cmiguard.kernels" \
    && echo "pip could not install cmiguard: linked it under $site instead"
}
started=$(mktemp)  # the committed results_gpu.* are older: only this run's come back
{
  step device
  nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv
  "$PY" -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
  "$PY" -c "import cmiguard" 2>/dev/null \
    || "$PY" -m pip install -q --no-deps --no-build-isolation -e . \
    || link_package
  step "compiled kernel tests"
  # compiling is most of their time (44 tests took 74 s on 2026-11-25; 160 now):
  # pytest-xdist (in the GPU image) compiles on several cores; SIGINT, not
  # SIGTERM, at the limit, so pytest still prints what passed and failed
  workers=()
  "$PY" -c "import xdist" 2>/dev/null && workers=(-n "${TEST_WORKERS:-8}")
  compiled() {
    CMIGUARD_TEST_COMPILED=1 CMIGUARD_BACKEND=triton timeout -s INT -k 20 "$1" \
      "$PY" -m pytest -q -p no:cacheprovider "${@:2}"
  }
  compiled "${TEST_S:-150}" ${workers[@]+"${workers[@]}"} --durations=5 \
    tests/test_kernels.py tests/test_kernels_compile.py tests/test_decode_graph.py
  step "device tests of the CLI and the trainer"
  # apart: a package the image lacks stops only these two
  compiled "${DEVICE_TEST_S:-40}" "tests/test_cli.py::test_purify_runs_on_the_device_asked_for" \
    "tests/test_trainer.py::test_training_runs_on_the_teachers_device"
  step "benchmark report"
  timeout "${REPORT_S:-170}" "$PY" bench/report.py
  step "kernels-vs-twin crossover"
  timeout "${CROSS_S:-90}" "$PY" bench/crossover.py --out "$OUT/crossover.json"
  step "launch-configuration sweep"
  timeout "${TUNE_S:-100}" "$PY" bench/tune_blocks.py --out "$OUT/tune_blocks.json"
  step done
} 2>&1 | tee "$OUT/gpu.log"
find bench -maxdepth 1 -name 'results_gpu.*' -newer "$started" -exec cp {} "$OUT/" \;
exit 0
