"""Purification inside transformers' ``generate()``.

``PurifyLogitsProcessor`` purifies the scores ``generate()`` samples from and
returns as ``output_scores``. Custom processors run after the built-in
repetition/length penalties and before temperature, top-k and top-p warping,
so sampling sees the purified distribution. ``output_logits=True`` would
still hand out the RAW logits: :func:`generate_purified` purifies those too.
Serving a model folded with :func:`cmiguard.fold_into_lm_head` needs none of this.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, LogitsProcessorList

from cmiguard.purify import purify
from cmiguard.transforms import LogitTransform, check_transform
from cmiguard.validation import check_temperature


class PurifyLogitsProcessor(LogitsProcessor):
    """``scores -> T(scores)/τ`` on every generation step, batched, CPU or CUDA.

    ``scores.shape[-1]`` is ``config.vocab_size``, which may be padded past the
    transform's vocabulary: padded columns are masked to ``-inf``.
    """

    def __init__(self, transform: LogitTransform, temperature: float | None = None) -> None:
        check_transform(transform)
        if temperature is not None:
            check_temperature(temperature)
        self.transform = transform
        self.temperature = temperature

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        return purify_padded(scores, self.transform, self.temperature)


def purify_padded(scores: Tensor, transform: LogitTransform, temperature: float | None) -> Tensor:
    """Purify the first ``transform.vocab_size`` columns; mask any padding beyond."""
    v = transform.vocab_size
    if scores.shape[-1] < v:
        raise ValueError(
            f"scores have {scores.shape[-1]} columns, fewer than the transform's vocab_size={v}"
        )
    if scores.shape[-1] == v:
        return purify(scores, transform, temperature)
    out = torch.full_like(scores, float("-inf"))
    out[..., :v] = purify(scores[..., :v].contiguous(), transform, temperature)
    return out


def generate_purified(
    model: nn.Module, transform: LogitTransform, temperature: float | None = None, **kwargs: Any
) -> Any:
    """``model.generate(**kwargs)`` whose scores and returned logits are purified."""
    processors = LogitsProcessorList(kwargs.pop("logits_processor", None) or [])
    processors.append(PurifyLogitsProcessor(transform, temperature))
    out = model.generate(logits_processor=processors, **kwargs)
    if getattr(out, "logits", None) is not None:
        out.logits = tuple(purify_padded(step, transform, temperature) for step in out.logits)
    return out
