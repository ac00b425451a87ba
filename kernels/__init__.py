"""Kernels behind cmiguard's hot paths and their pure-torch twins.

``reference``: the twins (oracle and CPU path). ``purify`` and ``cmi_loss``:
the Triton kernels, imported only when used, so that CPU users never need a
working Triton and tests can set ``TRITON_INTERPRET=1`` first.
"""

from __future__ import annotations

import os

from torch import Tensor

BACKENDS = ("triton", "torch")


def backend(tensor: Tensor) -> str:
    """``triton`` for CUDA tensors, ``torch`` for CPU ones; ``CMIGUARD_BACKEND`` forces one."""
    forced = os.environ.get("CMIGUARD_BACKEND", "")
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"CMIGUARD_BACKEND must be one of {BACKENDS}, got {forced!r}")
        if forced == "triton" and not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "CMIGUARD_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 in the "
                "environment before Python starts (the Triton interpreter)"
            )
        return forced
    return "triton" if tensor.is_cuda else "torch"
