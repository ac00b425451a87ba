"""The cmiguard command line: train a transform, purify stored logits, fold a
transform into a model, serve purified logprobs, evaluate a defense against
distillation attacks, and run the demo.

One module per command: ``register`` declares its options, ``cmd_<name>``
carries it out; ``options`` holds what they share.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial

from cmiguard.cli import demo, evaluate, fold, purify, serve, train
from cmiguard.cli.options import Help

COMMANDS = (train, purify, fold, serve, evaluate, demo)  # in --help's order


def version() -> str:
    """cmiguard's version and those of what a bug report needs."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    from cmiguard import __version__

    parts = []
    for name in ("torch", "triton", "transformers"):
        try:
            parts.append(f"{name} {installed(name)}")
        except PackageNotFoundError:
            parts.append(f"no {name}")
    return f"cmiguard {__version__} ({', '.join(parts)})"


def build_parser() -> argparse.ArgumentParser:
    """Every command's parser (options show their defaults)."""
    parser = argparse.ArgumentParser(prog="cmiguard", description=__doc__.split("\n\n")[0])
    parser.add_argument("--version", action="version", version=version())
    with_defaults = partial(argparse.ArgumentParser, formatter_class=Help)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=with_defaults)
    for command in COMMANDS:
        command.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; a bad input is one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError, ImportError) as exc:
        print(f"cmiguard {args.command}: error: {exc}", file=sys.stderr)
        return 2
