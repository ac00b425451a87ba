"""Purification inside transformers' ``generate()``.

:func:`generate_purified` runs ``generate()`` as if the model's LM head were
purified (what :func:`cmiguard.fold_into_lm_head` makes permanent, guard
included): every decoding mode, penalty and warper, ``output_scores`` and
``output_logits`` see ``T(z)/τ`` of the raw logits ``z``.

``PurifyLogitsProcessor`` purifies what ``generate()`` hands processors. In
greedy decoding and sampling that is the logits, after the built-in
penalties and before temperature, top-k and top-p. Beam search hands them
log-probs, and ``T`` is not shift-invariant (``T(log p)`` is another map):
there the processor takes only a centred transform, and refuses others.
``output_logits=True`` still returns the raw logits. Prefer
:func:`generate_purified`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor

from cmiguard.purify import purify
from cmiguard.transforms import LogitTransform, check_transform
from cmiguard.validation import are_log_probs, check_temperature


class PurifyLogitsProcessor(LogitsProcessor):
    """``scores -> T(scores)/τ`` on every generation step, batched, CPU or CUDA.

    ``scores.shape[-1]`` is ``config.vocab_size``, which may be padded past the
    transform's vocabulary: padded columns are masked to ``-inf``. Log-prob
    scores (beam search's) give the purified model's log-probs if the transform
    is shift-invariant, and are refused otherwise rather than purified wrongly.
    """

    def __init__(self, transform: LogitTransform, temperature: float | None = None) -> None:
        check_transform(transform)
        if temperature is not None:
            check_temperature(temperature)
        self.transform = transform
        self.temperature = temperature

    def __call__(self, input_ids: Tensor, scores: Tensor) -> Tensor:
        if not are_log_probs(scores):
            return purify_padded(scores, self.transform, self.temperature)
        if not self.transform.shift_invariant:
            raise ValueError(
                "PurifyLogitsProcessor was handed log-probs (every row's logsumexp is at "
                "most 0), as beam search hands processors; this transform is not "
                "shift-invariant, so it would serve T(log p), another map than T(z). Use "
                "cmiguard.generate_purified, which purifies the LM head's logits in every "
                "decoding mode, or a centered transform (cmiguard train --centered)"
            )
        # T(z − c) = T(z) − c: as log-probs, these are log_softmax(T(z)/τ), what the
        # folded model's beam search adds up. Tokens an earlier processor masked are
        # left out of the row the map reads: there it is the purified rest, renormalised
        return purify_padded(scores, self.transform, self.temperature, "logprobs")


def purify_padded(
    scores: Tensor,
    transform: LogitTransform,
    temperature: float | None,
    output: str = "logits",
) -> Tensor:
    """Purify the first ``transform.vocab_size`` columns; mask any padding beyond
    (``output`` as :func:`cmiguard.purify` takes it)."""
    v = transform.vocab_size
    if scores.shape[-1] < v:
        raise ValueError(
            f"scores have {scores.shape[-1]} columns, fewer than the transform's vocab_size={v}"
        )
    if scores.shape[-1] == v:
        return purify(scores, transform, temperature, output)
    out = torch.full_like(scores, float("-inf"))
    out[..., :v] = purify(scores[..., :v].contiguous(), transform, temperature, output)
    return out


def generate_purified(
    model: nn.Module, transform: LogitTransform, temperature: float | None = None, **kwargs: Any
) -> Any:
    """``model.generate(**kwargs)`` with the LM head's output purified while it
    runs (a forward hook, removed after): scores, logits and every decoding
    mode (beam search included) see ``T(z)/τ`` of the raw logits."""
    check_transform(transform)
    if temperature is not None:
        check_temperature(temperature)
    head = model.get_output_embeddings()
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embeddings (LM head) to purify")
    calls = 0

    def purified(module: nn.Module, args: Any, output: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return purify_padded(output, transform, temperature)

    handle = head.register_forward_hook(purified)
    try:
        out = model.generate(**kwargs)
    finally:
        handle.remove()
    if calls == 0:
        raise RuntimeError(
            f"{type(model).__name__} computed its logits without calling its LM head module, "
            "so nothing was purified: fold the transform into the model or use "
            "PurifyLogitsProcessor (greedy decoding and sampling)"
        )
    return out
