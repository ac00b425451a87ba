"""Kernels behind cmiguard's hot paths and their pure-torch twins.

``reference``: the twins (oracle and CPU path). ``purify`` and ``cmi_loss``:
the Triton kernels, imported only when used, so that CPU users never need a
working Triton and tests can set ``TRITON_INTERPRET=1`` first.
"""

from __future__ import annotations

import os

from torch import Tensor

BACKENDS = ("triton", "torch")

# Up to this many logits (128 MiB of fp32) the kernels lose to eager torch on
# the GPU: every call measured below it on an H100 (N <= 64 at any V, N = 1024
# at V = 32,000) ran at 0.07-0.54x eager, bound by launches and the torch
# combining of chunks (bench/RESULTS.md). The twin is eager's composition in at
# most four chunks of 32 MiB. Decode batches land here.
TWIN_MAX_LOGITS = 1 << 25


def auto_backend(device_type: str, n_logits: int) -> str:
    """The Triton kernels for CUDA tensors past ``TWIN_MAX_LOGITS``, the twin otherwise."""
    return "triton" if device_type == "cuda" and n_logits > TWIN_MAX_LOGITS else "torch"


def backend(tensor: Tensor) -> str:
    """Which implementation runs ``tensor``'s logits (:func:`auto_backend`);
    ``CMIGUARD_BACKEND`` forces one."""
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
    return auto_backend(tensor.device.type, tensor.numel())
