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
    assert run.stdout.split().count("project_kernel") == 2  # plain and centred
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


def test_register_pressure_reads_the_cubin():
    """bench/register_pressure.py's reading: a 128 × 128 lse tile spills more, and
    takes more shared memory, than 128 × 32."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parent.parent
    code = (
        "import sys; sys.path.insert(0, 'bench'); import register_pressure as r\n"
        "for bn, bv in ((128, 32), (128, 128)):\n"
        "    print(*r.usage(r.KERNELS[1], bn, bv, 8))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (small_regs, small_stack, small_shared), (big_regs, big_stack, big_shared) = [
        tuple(map(int, line.split())) for line in run.stdout.splitlines()
    ]
    assert 0 < small_regs <= 255 and 0 < big_regs <= 255
    assert big_stack > small_stack >= 0
    assert big_shared > small_shared > 0
