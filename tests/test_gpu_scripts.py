"""The scripts bench/gpu.sh runs on a lent GPU, checked here so that a lease
(15 minutes, rarely) is not spent on a wiring fault: bench/crossover.py's
reading of its timings, which sets the routing threshold (the kernels must
win from an N on, and a backend that failed, timed as None, wins nothing),
both sweeps end to end on a tiny shape under the interpreter, and the tests
it runs collect on what the GPU image holds."""

import json
import re
import subprocess
import sys
from pathlib import Path

from bench.crossover import crossovers
from bench.report import time_or_none
from bench.tune_blocks import CONFIGS

ROOT = Path(__file__).resolve().parent.parent
# cmiguard's extras that the GPU image lacks (its package list in the device
# tool's KINDS.md, read 2026-11-17)
NOT_ON_THE_GPU_IMAGE = ("pydantic", "fastapi", "uvicorn", "starlette", "openai", "datasets", "gguf")


def smoke(script: str, out: Path) -> dict:
    run = subprocess.run(
        [sys.executable, f"bench/{script}", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Error" not in run.stdout, run.stdout[-3000:]  # time_or_none prints failures
    return json.loads(out.read_text())


def test_the_crossover_sweep_runs_every_backend(tmp_path):
    result = smoke("crossover.py", tmp_path / "crossover.json")
    assert len(result["rows"]) == 4 and len(result["crossovers"]) == 2
    for row in result["rows"]:
        assert all(row[f"{k}_s"] > 0 for k in ("kernels", "twin", "eager")), row
        assert row["op"] == "train" or row["kernels_nograph_s"] > 0 < row["kernels_centred_s"]


def test_the_launch_sweep_runs_every_configuration(tmp_path):
    result = smoke("tune_blocks.py", tmp_path / "tune_blocks.json")
    rows = result["rows"]
    # per op the default, every configuration, and for purify the no-low-rank pass
    assert len(rows) == 2 * (1 + len(CONFIGS)) + 1
    assert all(r["s"] > 0 and r["of_copy_bandwidth"] > 0 for r in rows), rows
    assert {r["config"] for r in rows} >= {"default", "no low-rank", "32x128 r16 w8 tf32x3"}


def test_a_failed_timing_is_none_and_says_why(capsys):
    def fails(fn):
        raise RuntimeError("out of resource: shared memory, Required: 296960")

    assert time_or_none(lambda fn: 0.25, None, "purify N=1") == 0.25
    assert capsys.readouterr().out == ""
    assert time_or_none(fails, None, "train N=1 64x128 w8") is None
    assert capsys.readouterr().out == (
        "train N=1 64x128 w8: RuntimeError: out of resource: shared memory, Required: 296960\n"
    )


def test_the_crossover_is_where_the_kernels_win_for_good():
    def rows(op, kernels):
        return [
            {"op": op, "v": 10, "n": n, "kernels_s": k, "twin_s": 1.0}
            for n, k in zip((1, 2, 4, 8, 16), kernels, strict=False)
        ]

    timed = rows("purify", (2.0, 0.5, 1.5, 0.5, 0.4))  # a win at 2, lost again at 4
    timed += rows("train", (None, 0.5))  # the kernels failed at N = 1
    timed += rows("logits", (0.5, None))  # and at the largest N: no win for good
    assert crossovers(timed) == [
        {"op": "purify", "v": 10, "n": 8, "logits": 80},
        {"op": "train", "v": 10, "n": 2, "logits": 20},
        {"op": "logits", "v": 10, "n": None, "logits": None},
    ]


def test_the_tests_gpu_sh_runs_collect_without_what_the_gpu_image_lacks():
    """One module that fails to import stops a pytest run before any test: a
    server import at the top of tests/test_cli.py would have cost a lease its
    compiled kernel tests."""
    selected = re.findall(r"tests/[\w/.:]+", (ROOT / "bench" / "gpu.sh").read_text())
    assert len(selected) == 5, selected
    code = (
        "import sys, pytest\n"
        f"for m in {NOT_ON_THE_GPU_IMAGE!r}: sys.modules[m] = None  # import raises\n"
        "sys.exit(pytest.main(['--collect-only', '-q', '-p', 'no:cacheprovider', *sys.argv[1:]]))"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, *selected], cwd=ROOT, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stdout[-3000:]
    assert re.search(r"\b\d{3} tests collected", run.stdout), run.stdout[-500:]
