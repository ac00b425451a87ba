"""Apply a cmiguard transform inside vLLM (v1 engine, batch-level logits processors).

    CMIGUARD_TRANSFORM=runs/t/transform.safetensors \\
    vllm serve MODEL --logits-processors cmiguard.serve.vllm_adapter:CMIGuardLogitsProcessor \\
        --logprobs-mode processed_logprobs

Prefer serving a folded checkpoint (``cmiguard fold``): it needs no adapter and
its raw log-probs are already purified. The adapter refuses to start under
vLLM's default ``raw_logprobs`` mode, which computes returned log-probs from
the logits *before* any processor runs, i.e. unprotected. It purifies every
row (requests, and draft tokens under speculative decoding, are rows alike)
and declares itself not argmax-invariant, so greedy requests are not skipped.

Written against vLLM's documented v1 ``LogitsProcessor`` interface; this
module imports vLLM, which cmiguard does not install.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from cmiguard.checkpoint import load_transform
from cmiguard.serve.generation import purify_padded

try:
    from vllm.v1.sample.logits_processor import LogitsProcessor as _VllmLogitsProcessor
except ImportError as exc:  # pragma: no cover - exercised where vLLM is absent
    raise ImportError(
        "cmiguard.serve.vllm_adapter needs vLLM (pip install vllm); or serve a folded checkpoint: "
        "cmiguard fold --model ... --transform ... --out DIR, then vllm serve DIR"
    ) from exc

SAFE_MODES = ("processed_logprobs", "processed_logits")


def check_logprobs_mode(mode: str | None) -> None:
    """Refuse vLLM settings that would return unpurified log-probs."""
    if mode not in SAFE_MODES:
        raise ValueError(
            f"vLLM logprobs_mode={mode!r} returns log-probs computed before logits processors "
            f"run, so they would leak the raw distribution; start vLLM with --logprobs-mode "
            f"processed_logprobs (or processed_logits), or serve a folded checkpoint"
        )


class CMIGuardLogitsProcessor(_VllmLogitsProcessor):
    """Purifies every row of vLLM's ``[num_rows, vocab]`` logits."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        check_logprobs_mode(getattr(vllm_config.model_config, "logprobs_mode", None))
        path = os.environ.get("CMIGUARD_TRANSFORM")
        if not path:
            raise ValueError("set CMIGUARD_TRANSFORM to the transform file (.safetensors)")
        self.transform = load_transform(path, device=device)

    def is_argmax_invariant(self) -> bool:
        return False  # a learned transform can move the argmax: greedy requests must see it

    def update_state(self, batch_update: Any) -> None:
        """Every row is purified, so membership changes need no bookkeeping."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return purify_padded(logits, self.transform, None)
