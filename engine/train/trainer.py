"""Training a transform against a frozen teacher, streaming its logits batch by
batch, with atomic checkpoints and exact resume. It trains where the teacher
is: on a GPU the objectives run through the fused kernels."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from cmiguard.checkpoint import load_checkpoint, save_checkpoint, save_transform
from cmiguard.purify import StreamingCentroids
from cmiguard.train.data import Example, batches
from cmiguard.train.models import logits_rows, surrogate_probe
from cmiguard.train.objectives import anti_distillation_loss, gradient_misalignment_loss
from cmiguard.transforms import LogitTransform, make_transform

OBJECTIVES = ("paper", "cmi")


@dataclass
class TrainConfig:
    """Everything that decides the result; a resumed run must use the same."""

    objective: str = "paper"
    family: str = "lowrank"
    rank: int = 32
    epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-6
    weight_decay: float = 0.01
    warmup: float = 0.1
    lam: float = 1.0
    alpha: float = 0.5
    lambda_cmi: float = 1.0
    lambda_ce: float = 1.0
    lambda_kl: float = 0.0
    temperature: float = 1.0
    estimator: str = "exact"
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")


@dataclass
class TrainResult:
    transform: LogitTransform
    history: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0


def _schedule(total: int, warmup: float):
    """Linear warm-up over ``warmup`` of the steps, then cosine to zero."""
    warm = max(1, int(total * warmup))

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return factor


def _epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=gen).tolist()


def train(
    config: TrainConfig,
    teacher: nn.Module,
    examples: Sequence[Example],
    pad_id: int,
    surrogate: nn.Module | None = None,
    out_dir: str | Path | None = None,
    resume: bool = False,
    progress: bool = True,
    stop_after: int | None = None,
) -> TrainResult:
    """Train a transform on ``examples`` (rows from ``teacher``); see :class:`TrainConfig`.

    With ``out_dir`` a checkpoint is written every ``checkpoint_every`` steps
    and at the end (plus ``transform.safetensors``); ``resume=True`` continues
    from it and reaches the same transform as an uninterrupted run.
    ``stop_after`` ends after that many steps (used to test resuming).
    The transform lives on the teacher's device (the surrogate must be there too).
    """
    if not examples:
        raise ValueError("the training dataset is empty")
    if config.objective == "paper" and surrogate is None:
        raise ValueError("the paper objective needs a surrogate student model")
    device = next(teacher.parameters()).device
    if surrogate is not None and next(surrogate.parameters()).device != device:
        raise ValueError(
            f"the surrogate is on {next(surrogate.parameters()).device}, the teacher on {device}: "
            "move both to one device"
        )
    vocab = teacher.get_output_embeddings().weight.shape[0]
    torch.manual_seed(config.seed)
    # drawn on the CPU, then moved: the same initial transform on every device
    transform = make_transform(config.family, vocab, config.rank, temperature=config.temperature)
    transform = transform.to(device)
    params = [p for p in transform.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, config.warmup))
    history: list[dict[str, float]] = []
    centroids = StreamingCentroids(vocab) if config.estimator == "streaming" else None
    start = 0
    ckpt_path = Path(out_dir) / "checkpoint.pt" if out_dir is not None else None
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        if state["config"] != asdict(config):
            raise ValueError(
                f"{ckpt_path} was written with another configuration; resume needs the same "
                f"settings (saved: {state['config']})"
            )
        transform.load_state_dict(state["transform"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start = state["history"], state["step"]
        if centroids is not None:
            centroids.centroids = {k: v.to(device) for k, v in state["centroids"].items()}

    def checkpoint(step: int) -> None:
        if ckpt_path is None:
            return
        save_checkpoint(
            ckpt_path,
            {
                "config": asdict(config),
                "step": step,
                "transform": transform.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "centroids": centroids.centroids if centroids is not None else None,
            },
        )

    bar = tqdm(total=total, initial=start, disable=not progress, desc=f"train ({config.objective})")
    step = 0
    for epoch in range(config.epochs):
        order = _epoch_order(len(examples), config.seed, epoch)
        first = max(0, start - epoch * steps_per_epoch) * config.batch_size
        step = epoch * steps_per_epoch + first // config.batch_size
        for batch in batches(examples, config.batch_size, pad_id, order[first:]):
            if stop_after is not None and step >= stop_after:
                bar.close()
                checkpoint(step)
                return TrainResult(transform, history, start)
            stats = _step(config, teacher, surrogate, transform, batch.to(device), centroids)
            optimizer.zero_grad(set_to_none=True)
            stats.pop("_loss").backward(inputs=params)
            optimizer.step()
            scheduler.step()
            step += 1
            history.append({"step": step, **stats})
            bar.update(1)
            bar.set_postfix({k: f"{v:.3f}" for k, v in stats.items() if k != "step"})
            if step % config.checkpoint_every == 0:
                checkpoint(step)
    bar.close()
    checkpoint(step)
    if out_dir is not None:
        save_transform(transform, Path(out_dir) / "transform.safetensors")
    return TrainResult(transform, history, start)


def _step(
    config: TrainConfig,
    teacher: nn.Module,
    surrogate: nn.Module | None,
    transform: LogitTransform,
    batch: Any,
    centroids: StreamingCentroids | None,
) -> dict[str, Any]:
    """One batch's loss (under ``_loss``) and its logged terms."""
    with torch.no_grad():
        z = logits_rows(teacher, batch.input_ids, batch.attention_mask, batch.rows)
    if config.objective == "paper":
        probe = surrogate_probe(surrogate, batch.input_ids, batch.attention_mask, batch.rows)
        loss, stats = gradient_misalignment_loss(
            z, batch.labels, transform, probe, config.lam, config.alpha, return_stats=True
        )
    else:
        loss, stats = anti_distillation_loss(
            z,
            batch.labels,
            transform,
            config.lambda_cmi,
            config.lambda_ce,
            config.lambda_kl,
            config.temperature,
            config.estimator,
            state=centroids,
            return_stats=True,
        )
    return {"_loss": loss, "loss": float(loss.detach()), **stats}
