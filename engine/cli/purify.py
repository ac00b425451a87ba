"""``cmiguard purify``: stored logits shards purified block by block."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from tqdm.auto import tqdm

from cmiguard.cli.options import DEVICE_HELP, at_least_one, folder, positive, resolve_device


def cmd_purify(args: argparse.Namespace) -> int:
    import torch

    from cmiguard.checkpoint import load_transform
    from cmiguard.purify import purify
    from cmiguard.shards import LogitsShard, write_streamed
    from cmiguard.validation import FLOAT_DTYPES, check_not_log_probs, check_top_k

    device = resolve_device(args.device)
    transform = load_transform(args.transform).to(device)

    def purified(shard: LogitsShard) -> Iterator:
        """The shard's purified row blocks; a bad row is named by file and rows."""
        start = 0
        for block in shard.blocks(args.block_rows):
            try:
                out = purify(block.to(device), transform, args.temperature, args.output, args.top_k)
            except ValueError as exc:
                rows = f"rows {start}-{start + len(block) - 1}"
                raise ValueError(f"{shard.path}, {rows}: {exc}") from exc
            start += len(block)
            yield tuple(t.cpu() for t in out) if args.top_k else out.cpu()

    out_dir = Path(args.out)
    shards = [LogitsShard(p, args.key) for p in args.inputs]

    def target(shard: LogitsShard) -> Path:
        """The same file name; top-k values and ids of a .npy shard go to .safetensors
        (one .npy file holds one array)."""
        if args.top_k is not None and shard.path.suffix == ".npy":
            return out_dir / f"{shard.path.stem}.safetensors"
        return out_dir / shard.path.name

    # every shard checked before any is written: a bad one late in the list costs nothing
    names = [target(s).name for s in shards]
    if len(set(names)) < len(names):
        twice = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"inputs would share output names {twice} in {out_dir}")
    check_top_k(args.top_k, transform.vocab_size)
    for shard in shards:
        if target(shard).resolve() == shard.path.resolve():
            raise ValueError(f"--out {out_dir} would overwrite the input {shard.path}")
        if shard.dtype not in FLOAT_DTYPES:  # numpy's default float64, say
            raise ValueError(
                f"{shard.path} holds {shard.dtype} logits; purify takes float32, bfloat16 or "
                "float16 (cast the array first, as numpy's astype(np.float32) does)"
            )
        if shard.shape[1] != transform.vocab_size:
            raise ValueError(
                f"{shard.path} has vocab {shard.shape[1]}, the transform vocab_size="
                f"{transform.vocab_size}"
            )
        if not (args.allow_log_probs or transform.shift_invariant) and shard.shape[0]:
            # a few rows tell logits from log-probs (logsumexp 14-38 nats or 0) and are
            # read again when purified; a whole first block would cost its size twice
            head = next(shard.blocks(min(args.block_rows, 64)))
            try:
                check_not_log_probs(head, "pass --allow-log-probs")
            except ValueError as exc:
                raise ValueError(f"{shard.path}: {exc}") from exc
    total = sum(s.shape[0] for s in shards)
    with tqdm(total=total, unit="row", desc="purify") as bar:
        for shard in shards:
            if args.top_k is None:
                write_streamed(
                    target(shard), shard.shape, shard.dtype, purified(shard), on_block=bar.update
                )
                continue
            # values and ids are [N, k]: small, so both are written once the shard is done
            pairs = list(purified(shard))
            empty = torch.empty(0, args.top_k, dtype=shard.dtype)
            values = torch.cat([v for v, _ in pairs] or [empty])
            ids = torch.cat([i for _, i in pairs] or [empty.long()])
            write_streamed(
                target(shard),
                tuple(values.shape),
                values.dtype,
                iter([values]),
                extra={"ids": ids},
                on_block=bar.update,
                name="values",
            )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """purify and its options."""
    p = sub.add_parser("purify", help="purify logits shards (.safetensors or .npy), streaming")
    p.add_argument("inputs", nargs="+", help="logits shards [rows, vocab]")
    p.add_argument("--transform", required=True, help="a transform file written by train")
    p.add_argument(
        "--out",
        type=folder,
        required=True,
        help="output folder: the same file names (top-k of a .npy shard: NAME.safetensors)",
    )
    p.add_argument("--key", default=None, help="tensor name in safetensors inputs")
    p.add_argument(
        "--output",
        choices=("logits", "logprobs"),
        default="logits",
        help="purified logits T(z)/temperature, or their log-softmax",
    )
    p.add_argument(
        "--top-k",
        type=at_least_one,
        default=None,
        help="keep each row's k largest values ('values') and their token ids ('ids')",
    )
    p.add_argument(
        "--temperature", type=positive, default=None, help="in place of the transform's own"
    )
    p.add_argument(
        "--block-rows",
        type=at_least_one,
        default=1024,
        help="rows read, purified and written at a time",
    )
    p.add_argument(
        "--allow-log-probs",
        action="store_true",
        help="purify shards whose rows are log-probabilities (refused by default: the "
        "transform maps logits and is not shift-invariant, so this is another map)",
    )
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.set_defaults(func=cmd_purify)
