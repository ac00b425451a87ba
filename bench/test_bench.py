"""pytest-benchmark suites: ``pytest bench --benchmark-enable`` (add ``--benchmark-json``).

One group per problem, so pytest-benchmark's table shows ours, eager and
torch.compile side by side. Shapes are the CPU-sized ones; on CUDA the full
grid is in ``bench/report.py``.
"""

import pytest
import torch

from bench.problems import Case, implementations, make_inputs

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CASES = [
    Case(op, n, v, r)
    for op in ("purify", "train")
    for n, v, r in [(1, 151_936, 16), (64, 49_152, 64), (1024, 32_000, 16)]
]


@pytest.mark.parametrize("impl", ["ours", "eager", "compile"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "_"))
def test_speed(benchmark, case, impl):
    z, labels, t = make_inputs(case, DEVICE)
    fn = implementations(case, z, labels, t)[impl]
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    fn()  # warm-up and compile outside the timing

    def run():
        fn()
        sync()

    benchmark.group = case.label
    # a timing, not a test: `make bench` enables it (pytest's default run disables
    # pytest-benchmark and calls `run` once, which still checks that it runs)
    benchmark.pedantic(run, rounds=5, iterations=1)
