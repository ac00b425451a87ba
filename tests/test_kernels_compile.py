import os
import subprocess
import sys
from pathlib import Path


def test_kernels_compile_for_hopper():
    """Ahead-of-time compilation to sm_90 PTX, in a process without the interpreter."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    root = Path(__file__).resolve().parent.parent
    run = subprocess.run(
        [sys.executable, "-m", "tests.aot_compile"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.split().count("stats_kernel") == 2
    assert run.stdout.split().count("purify_kernel") == 3  # incl. the guarded variant
    assert run.stdout.split().count("lse_kernel") == 2
    assert run.stdout.split().count("fixup_kernel") == 2  # log-probs and the guard's logits
    for name in (
        "grad_kernel",
        "purify_kernel",
        "lse_kernel",
        "project_kernel",
        "grad_u_kernel",
        "grad_factors_kernel",
        "decode_write_kernel",
    ):
        assert name in run.stdout
