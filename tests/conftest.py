import os

# The kernel tests run the Triton kernels on CPU tensors through the
# interpreter; it must be on before any @triton.jit runs. On a GPU machine
# CMIGUARD_TEST_COMPILED=1 keeps the compiled kernels instead.
if not os.environ.get("CMIGUARD_TEST_COMPILED"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from packaging.version import Version  # noqa: E402

torch.set_num_threads(2)


def interpreter_fault(triton_version: str, numpy_version: str) -> str | None:
    """Why the Triton interpreter cannot run the kernel tests with these
    versions, or None. Triton 3.6's interpreter reads a runtime loop bound
    with ``int()`` of a one-element array, which NumPy 2.4 made an error
    (triton-lang/triton#9171, fixed in 3.7): every kernel test would then fail
    on that line, not on the kernels. The GPU machines' image is that pair."""
    if Version(triton_version) < Version("3.7") and Version(numpy_version) >= Version("2.4"):
        return (
            f"the Triton interpreter of triton {triton_version} cannot run loops with "
            f"numpy {numpy_version} (triton-lang/triton#9171): install numpy<2.4 or "
            "triton>=3.7, or on a GPU run the kernels compiled (CMIGUARD_TEST_COMPILED=1)"
        )
    return None


def pytest_configure(config):
    """Refuse, with the reason, to run the kernel tests on a broken interpreter."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        import triton
    except ImportError:  # no Triton (not Linux): the twins alone are tested
        return
    fault = interpreter_fault(triton.__version__, numpy.__version__)
    if fault:
        raise pytest.UsageError(fault)


@pytest.fixture(autouse=True)
def _seed():
    """Transforms draw A from the global generator: make every test start the same."""
    torch.manual_seed(0)


@pytest.fixture(params=["decode", "general"])
def path(request, monkeypatch):
    """Run purify's decode path (N <= DECODE_MAX_ROWS, the default at these
    sizes) and its general path on the same rows."""
    from cmiguard.kernels import purify as purify_module

    if request.param == "general":
        monkeypatch.setattr(purify_module, "DECODE_MAX_ROWS", 0)
    return request.param


@pytest.fixture(scope="session")
def teacher():
    """The real SmolLM2-135M-Instruct (make test installs its wheel)."""
    from cmiguard.train.models import load_teacher

    return load_teacher()


def random_logits(n: int, v: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, v, generator=gen) * scale


def trained_like(transform, seed: int = 1, scale: float = 0.01):
    """Give a transform non-trivial parameters (as after training)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in transform.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale)
    return transform
