"""Folding a transform into a model's LM head: purified serving at no extra cost.

The transforms are affine in ``z = h Eᵀ + c``, so ``T(z)/τ`` is again a
linear head of the hidden state; the folded model is an ordinary checkpoint
that any server (vLLM included) loads unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from cmiguard.transforms import LogitTransform, check_transform


def fold_into_lm_head(model: nn.Module, transform: LogitTransform) -> nn.Module:
    """Make ``model``'s own logits the purified ones, ``T(z)/τ`` (in place; returned).

    Unties the LM head from the input embeddings first. The folded model is a
    normal checkpoint: ``save_pretrained`` and any server load it unchanged.
    """
    check_transform(transform)
    if transform.guard_margin is not None:
        raise ValueError(
            "this transform has an argmax guard, which needs the raw logits and is not a "
            "linear map: it cannot be folded into an LM head; apply it per step "
            "(cmiguard serve --transform, generate_purified, the vLLM adapter)"
        )
    head = model.get_output_embeddings()
    if head.weight.shape[0] != transform.vocab_size:
        raise ValueError(
            f"the model's LM head has {head.weight.shape[0]} rows, the transform "
            f"vocab_size={transform.vocab_size}"
        )
    with torch.no_grad():
        weight, bias = transform.fold(head.weight, head.bias)
        weight = weight / transform.temperature
        if bias is not None:
            bias = bias / transform.temperature
        if head.bias is None and bias is not None:
            if bias.abs().max() > 0:
                raise ValueError(
                    "this transform has a bias but the model's LM head has none; "
                    "train the transform without bias to fold it"
                )
            bias = None
        model.config.tie_word_embeddings = False
        if hasattr(model.config, "get_text_config"):
            model.config.get_text_config().tie_word_embeddings = False
        head.weight = nn.Parameter(weight.to(head.weight.dtype), requires_grad=False)
        if bias is not None:
            head.bias = nn.Parameter(bias.to(head.weight.dtype), requires_grad=False)
    return model
