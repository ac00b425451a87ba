"""``cmiguard serve``: the OpenAI-compatible server, from its options."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cmiguard.cli.options import DEVICE_HELP, model_args, resolve_device


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    check_address(args.host, args.port)  # before the model loads, which takes minutes
    uvicorn.run(serve_app(args), host=args.host, port=args.port)
    return 0


def check_address(host: str, port: int) -> None:
    """Refuse an address this server could not listen on (a port in use, a host
    this machine does not have), bound as uvicorn's ``bind_socket`` binds it
    (IPv6 only for a host with a colon, so ``localhost`` needs no IPv6)."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
    except OSError as exc:
        raise ValueError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


def _port(text: str) -> int:
    """An argparse type: a TCP port (0: any free one)."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be in [0, 65535], got {value}")
    return value


def serve_app(args: argparse.Namespace) -> Any:
    """The app ``cmiguard serve`` runs, from its arguments."""
    import math
    import os

    from cmiguard.checkpoint import load_transform, read_metadata, vocab_fingerprint
    from cmiguard.serve.engine import check_api_key
    from cmiguard.serve.server import ServerConfig, create_app
    from cmiguard.train.models import load_model

    device = resolve_device(args.device)
    if args.temperature is not None and not (
        args.transform and math.isfinite(args.temperature) and args.temperature >= 1e-3
    ):
        raise ValueError("--temperature needs --transform and a finite value >= 0.001")
    # an empty --api-key "$KEY" (KEY unset) is refused, not read as "no key"
    source = "--api-key" if args.api_key is not None else "CMIGUARD_API_KEY"
    key = args.api_key if args.api_key is not None else os.environ.get(source)
    check_api_key(key, source)
    # built (and so checked) before the model loads: a bad limit fails at once
    config = ServerConfig(
        model_name=args.name,
        api_key=key,
        max_batch=args.max_batch,
        max_queue=args.max_queue,
        max_prompt_tokens=args.max_prompt_tokens,
        max_new_tokens=args.max_new_tokens,
        timeout_s=args.timeout,
        echo=args.echo,
    )
    if bool(args.transform) == args.unprotected:
        raise ValueError(
            "--unprotected serves raw logits and --transform purifies them: pass one (a folded "
            "checkpoint is served with --unprotected)"
        )
    if args.transform:
        read_metadata(args.transform)
    template = _read_template(args.chat_template) if args.chat_template else None
    model, tokenizer = load_model(args.model, args.dtype, device)
    if template is not None:
        _set_chat_template(tokenizer, template, args.chat_template)
    transform = None
    if args.transform:
        rows = model.get_output_embeddings().weight.shape[0]
        transform = load_transform(
            args.transform, vocab_size=rows, vocab_fingerprint=vocab_fingerprint(tokenizer)
        ).to(device)
        if args.temperature is not None:
            transform.temperature = args.temperature
    return create_app(model, tokenizer, transform, config)


def _read_template(path: str) -> str:
    """A chat template file's text (read before the model loads)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"--chat-template {path}: no such file")
    return Path(path).read_text(encoding="utf-8")


def _set_chat_template(tokenizer: Any, template: str, path: str) -> None:
    """Use ``template`` for chat, after rendering one message with it."""
    tokenizer.chat_template = template
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
        )
    except Exception as exc:  # jinja raises its own types for a broken template
        raise ValueError(f"--chat-template {path} does not render a message: {exc}") from exc


def register(sub: argparse._SubParsersAction) -> None:
    """serve and its options."""
    p = sub.add_parser("serve", help="OpenAI-compatible server with purified logprobs")
    model_args(p)
    p.add_argument("--transform", default=None, help="transform applied to every step's logits")
    p.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="serve at this temperature instead of the transform's own (see docs/EVALUATION.md)",
    )
    p.add_argument(
        "--unprotected",
        action="store_true",
        help="serve without a transform (for a folded checkpoint, or to measure overhead)",
    )
    p.add_argument("--name", default="smollm2-135m-cmiguard", help="the model id clients ask for")
    p.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    p.add_argument("--port", type=_port, default=8000, help="the port to listen on")
    p.add_argument(
        "--api-key",
        default=None,
        help="require 'Authorization: Bearer KEY' (or set CMIGUARD_API_KEY: not visible in ps)",
    )
    p.add_argument("--max-batch", type=int, default=16, help="rows decoded together")
    p.add_argument(
        "--max-queue", type=int, default=256, help="requests waiting; past it a 429 (queue_full)"
    )
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts get a 400")
    p.add_argument(
        "--max-new-tokens", type=int, default=256, help="the largest max_tokens a request may ask"
    )
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument(
        "--no-echo",
        dest="echo",
        action="store_false",
        help="refuse echo=true (with logprobs it scores any text teacher-forced)",
    )
    p.add_argument(
        "--chat-template",
        default=None,
        metavar="FILE",
        help="a Jinja chat template for /v1/chat/completions, in place of the tokenizer's "
        "(a base model has none)",
    )
    p.set_defaults(func=cmd_serve)
