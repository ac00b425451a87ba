"""Run inside the vLLM environment (``make test-vllm`` builds it): the
adapter against vLLM's own interfaces, without starting an engine.

    .venv-vllm/bin/python -m tests.vllm_probe MODEL_DIR GOOD.safetensors FOREIGN.safetensors
    .venv-vllm/bin/python -m tests.vllm_probe MODEL_DIR GOOD.safetensors --engine

Prints one JSON object that tests/test_vllm.py asserts on. Without
``--engine``: whether vLLM's loaders accept each class for each runner, which
start-up and per-request settings the adapter refuses (and with what
message), and how far the V2 processor's output is from ``cmiguard.purify``.
With ``--engine``: vLLM's offline engine (V1 runner, in this process) with the
adapter, recording the logits vLLM hands it; how far what vLLM returns is
from ``cmiguard.purify`` of those very logits.
"""

from __future__ import annotations

import json
import os
import sys

import torch


def error_of(fn) -> str | None:
    try:
        fn()
    except Exception as exc:  # the message is what the test checks
        return f"{type(exc).__name__}: {exc}"
    return None


def main(model_dir: str, good: str, foreign: str) -> dict:
    from vllm import SamplingParams
    from vllm.engine.arg_utils import EngineArgs
    from vllm.v1.sample.logits_processor import validate_logits_processors_parameters
    from vllm.v1.worker.gpu.sample.logits_processor import (
        build_custom_logits_processors_params_validator,
    )
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcRequestState
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    from cmiguard import load_transform, purify
    from cmiguard.serve.vllm_adapter import CMIGuardLogitsProcessor, CMIGuardLogitsProcessorV2

    v1 = "cmiguard.serve.vllm_adapter:CMIGuardLogitsProcessor"
    v2 = "cmiguard.serve.vllm_adapter:CMIGuardLogitsProcessorV2"

    def config(mode: str):
        args = EngineArgs(model=model_dir, dtype="float32", max_model_len=256, logprobs_mode=mode)
        return args.create_engine_config()

    safe, raw = config("processed_logprobs"), config("raw_logprobs")
    out: dict = {}

    def start(cfg, path):
        os.environ["CMIGUARD_TRANSFORM"] = path
        return CMIGuardLogitsProcessor(cfg, torch.device("cpu"), False)

    out["start_ok"] = error_of(lambda: start(safe, good))
    out["start_raw_logprobs"] = error_of(lambda: start(raw, good))
    out["start_foreign_vocab"] = error_of(lambda: start(safe, foreign))
    out["v2_loader_takes_v2"] = error_of(lambda: _load_v2_logitsprocs_by_fqcns([v2]))
    out["v2_loader_takes_v1"] = error_of(lambda: _load_v2_logitsprocs_by_fqcns([v1]))
    requests = {
        "greedy_logprobs": SamplingParams(logprobs=3, temperature=0.0),
        "t1_logprobs": SamplingParams(logprobs=3, temperature=1.0),
        "sampled_no_logprobs": SamplingParams(temperature=0.7, top_p=0.9),
        "prompt_logprobs": SamplingParams(prompt_logprobs=1),
        "logit_bias": SamplingParams(logit_bias={5: 100.0}),
        "logprobs_t07": SamplingParams(logprobs=3, temperature=0.7),
        "logprobs_top_p": SamplingParams(logprobs=3, top_p=0.5),
        "logprobs_penalty": SamplingParams(logprobs=3, presence_penalty=0.5),
    }
    validate_v2 = build_custom_logits_processors_params_validator([v2])
    out["v1_requests"] = {
        name: error_of(lambda p=p: validate_logits_processors_parameters([v1], p))
        for name, p in requests.items()
    }
    out["v2_requests"] = {
        name: error_of(lambda p=p: validate_v2(p)) for name, p in requests.items()
    }
    os.environ["CMIGUARD_TRANSFORM"] = good
    vocab = safe.model_config.get_vocab_size()
    state = LogitsProcRequestState(torch.device("cpu"), 4, vocab, None, None, None, None)
    processor = CMIGuardLogitsProcessorV2(safe, state)
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(0)) * 3
    want = purify(logits, load_transform(good))
    got = processor.apply(logits.clone(), None)
    out["v2_apply_max_abs_diff"] = float((got - want).abs().max())
    out["v2_add_request"] = processor.add_request(0, requests["greedy_logprobs"])
    return out


def engine(model_dir: str, good: str) -> dict:
    """Greedy completions of two prompts in one batch through the adapter."""
    os.environ["CMIGUARD_TRANSFORM"] = good
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the processor lives in this process
    from vllm import LLM, SamplingParams

    from cmiguard import load_transform, purify
    from cmiguard.serve.vllm_adapter import CMIGuardLogitsProcessor

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    class Recording(CMIGuardLogitsProcessor):
        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            raw = logits.clone()
            out = super().apply(logits)
            seen.append((raw, out.clone()))
            return out

    llm = LLM(
        model=model_dir,
        dtype="float32",
        max_model_len=256,
        enforce_eager=True,
        logits_processors=[Recording],
        logprobs_mode="processed_logprobs",
    )
    prompts = ["The capital of France is", "Once upon a time"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=4, logprobs=5, temperature=0))
    transform = load_transform(good)
    # step s, row r: vLLM's returned top-5 against log_softmax of what the adapter returned
    returned, adapter = 0.0, 0.0
    for raw, purified in seen:
        adapter = max(adapter, float((purified - purify(raw, transform)).abs().max()))
    for row, out in enumerate(outs):
        for step, top in enumerate(out.outputs[0].logprobs):
            want = torch.log_softmax(seen[step][1][row], -1)
            for token, lp in top.items():
                returned = max(returned, abs(lp.logprob - float(want[token])))
    return {"steps": len(seen), "rows": seen[0][0].shape[0], "adapter_vs_purify": adapter,
            "returned_vs_adapter": returned}  # fmt: skip


if __name__ == "__main__":
    if "--engine" in sys.argv:
        print(json.dumps(engine(sys.argv[1], sys.argv[2])))
    else:
        print(json.dumps(main(*sys.argv[1:4])))
