"""Training a transform against a frozen teacher, with atomic checkpoints,
exact resume, a visible log and the seed's selection rule.

The teacher's logits for every row (and the surrogate's residuals, for the
seed's objective) are computed once (:mod:`cmiguard.train.rows`); each step
then costs the transform, the softmax and the surrogate's last MLP and
head. Every step's terms go to ``train_log.jsonl`` and ``training.png``;
every ``select_every`` steps the transform is scored on validation rows and
the best one that keeps the teacher's answers is kept (the seed's rule: the
lowest held-out misalignment with teacher accuracy within 1 point and top-1
agreement ≥ 0.99). It trains where the teacher is: on a GPU the objectives
run through the fused kernels.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cmiguard.checkpoint import (
    atomic_write,
    changed_settings,
    load_checkpoint,
    save_checkpoint,
    save_transform,
)
from cmiguard.purify import StreamingCentroids, cmi, purify
from cmiguard.train.data import Example, rows_digest
from cmiguard.train.metrics import scores
from cmiguard.train.models import probe_from_residual
from cmiguard.train.objectives import (
    UTILITIES,
    anti_distillation_loss,
    check_alpha,
    gradient_cosine,
    gradient_misalignment_loss,
    utility_loss,
)
from cmiguard.train.rows import RowSet, teacher_rows, with_residuals
from cmiguard.transforms import (
    FAMILIES,
    INITS,
    LogitTransform,
    check_centered,
    check_dense,
    make_transform,
)

OBJECTIVES = ("paper", "cmi")
# the seed's selection rule: answers kept within 1 point, argmax on ≥ 99% of rows
ACCURACY_BUDGET = 0.01
MIN_TOP1 = 0.99


@dataclass
class TrainConfig:
    """Everything that decides the result; a resumed run must use the same."""

    objective: str = "paper"
    family: str = "lowrank"
    rank: int = 32
    # which low-rank factor starts at zero ("lora": B; "seed": A), and a small
    # random start for it (the seed's cosine has no gradient at the identity)
    init: str = "lora"
    init_scale: float = 0.0
    # put each row's raw argmax back on top by this margin (None: no guard)
    guard_margin: float | None = None
    # the kernels read A and B in bf16 (the parameters stay fp32 masters)
    factor_dtype: str | None = None
    # A's columns centred: a shift-invariant map (lowrank only)
    centered: bool = False
    utility: str = "ce"
    epochs: int = 1
    batch_size: int = 8
    lr: float = 2e-6
    weight_decay: float = 0.01
    warmup: float = 0.1
    # the first steps train the utility term alone (a way off the identity)
    cos_warmup: int = 0
    lam: float = 1.0
    alpha: float = 0.5
    lambda_cmi: float = 1.0
    lambda_ce: float = 1.0  # cmi objective: the utility term's weight
    lambda_kl: float = 0.0
    temperature: float = 1.0
    estimator: str = "exact"
    seed: int = 0
    checkpoint_every: int = 25
    # score on validation rows every this many steps (0: at the end of each epoch)
    select_every: int = 0

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("objective", self.objective, OBJECTIVES),
            ("family", self.family, FAMILIES),
            ("init", self.init, INITS),
            ("utility", self.utility, UTILITIES),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError("epochs and batch_size must be >= 1")
        if self.select_every < 0 or self.cos_warmup < 0 or self.checkpoint_every < 1:
            raise ValueError(
                "select_every and cos_warmup must be >= 0 and checkpoint_every >= 1, got "
                f"{self.select_every}, {self.cos_warmup} and {self.checkpoint_every}"
            )
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup is a share of the steps in [0, 1), got {self.warmup}")
        # a NaN weight trained a NaN transform and reported success; a negative one
        # raises what the defense lowers
        for name in ("lam", "lambda_cmi", "lambda_ce", "lambda_kl"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite weight >= 0, got {value}")
        check_alpha(self.alpha)
        if self.family == "dense" and (self.init != "lora" or self.init_scale):
            raise ValueError("init and init_scale choose the low-rank factors: not for dense")
        if self.centered:  # refused here, before any teacher row is computed
            check_centered(self.family)


@dataclass
class TrainResult:
    transform: LogitTransform  # the selected one (the last one without validation rows)
    history: list[dict[str, float]] = field(default_factory=list)
    selections: list[dict[str, Any]] = field(default_factory=list)
    selected_step: int | None = None
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


def build_transform(config: TrainConfig, vocab: int) -> LogitTransform:
    """The initial transform a config trains (drawn from the global generator)."""
    kwargs: dict[str, Any] = {
        "temperature": config.temperature,
        "guard_margin": config.guard_margin,
    }
    if config.family != "dense":
        kwargs |= {
            "init": config.init,
            "init_scale": config.init_scale,
            "factor_dtype": config.factor_dtype,
        }
    if config.centered:
        kwargs["centered"] = True
    return make_transform(config.family, vocab, config.rank, **kwargs)


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
    validation: Sequence[Example] = (),
    rows: RowSet | None = None,
    fingerprint: str = "",
) -> TrainResult:
    """Train a transform on ``examples`` (rows from ``teacher``); see :class:`TrainConfig`.

    ``rows`` are the examples' teacher rows if already computed (with the
    surrogate's residuals for the paper objective). With ``validation``
    examples the transform is scored every ``select_every`` steps (and at
    steps 0 and last) and the best admissible one is returned; without, the
    last one. With ``out_dir``: ``checkpoint.pt`` every ``checkpoint_every``
    steps and at the end (``resume=True`` continues from it and reaches the
    same transform as an uninterrupted run), ``transform.safetensors`` (the
    selected), ``last.safetensors``, ``trajectory/step<N>.safetensors`` at
    every selection point, ``train_log.jsonl`` and ``training.png``.
    ``stop_after`` ends after that many steps (used to test resuming).
    ``fingerprint`` (:func:`cmiguard.vocab_fingerprint`) goes into every file.
    """
    if not examples:
        raise ValueError("the training dataset is empty")
    if config.objective == "paper" and surrogate is None:
        raise ValueError("the paper objective needs a surrogate student model")
    if config.family == "dense":  # before the teacher rows are computed
        check_dense(teacher.get_output_embeddings().weight.shape[0])
    device = next(teacher.parameters()).device
    if surrogate is not None and next(surrogate.parameters()).device != device:
        raise ValueError(
            f"the surrogate is on {next(surrogate.parameters()).device}, the teacher on {device}: "
            "move both to one device"
        )
    paper = config.objective == "paper"
    if rows is None:
        rows = teacher_rows(teacher, examples, pad_id, progress=progress, desc="teacher rows")
    if paper and rows.residual is None:
        rows = with_residuals(rows, surrogate, examples, pad_id)
    held = None
    if validation:
        held = teacher_rows(teacher, validation, pad_id, progress=False)
        held = with_residuals(held, surrogate, validation, pad_id) if paper else held
    vocab = teacher.get_output_embeddings().weight.shape[0]
    torch.manual_seed(config.seed)
    # drawn on the CPU, then moved: the same initial transform on every device
    transform = build_transform(config, vocab).to(device)
    params = [p for p in transform.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(examples) / config.batch_size)
    total = steps_per_epoch * config.epochs
    select_every = config.select_every or steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(total, config.warmup))
    history: list[dict[str, float]] = []
    selections: list[dict[str, Any]] = []
    best: dict[str, Any] | None = None
    centroids = StreamingCentroids(vocab) if config.estimator == "streaming" else None
    start = 0
    out = Path(out_dir) if out_dir is not None else None
    ckpt_path = out / "checkpoint.pt" if out is not None else None
    digest = rows_digest([*examples, *validation])
    if resume and ckpt_path is not None and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path)
        # a setting added since the checkpoint was written has its default there
        saved = {**asdict(TrainConfig()), **state["config"]}
        if saved != asdict(config):
            raise ValueError(
                f"{ckpt_path} was written with other settings: "
                f"{changed_settings(saved, asdict(config))}; resume needs the same "
                "(or choose another output folder)"
            )
        if state.get("rows_digest", digest) != digest:  # (checkpoints before 2026-12-07 have none)
            raise ValueError(
                f"{ckpt_path} was written for other training or validation rows; resume "
                "needs the same data (or choose another output folder)"
            )
        transform.load_state_dict(state["transform"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history, start = state["history"], state["step"]
        selections, best = state["selections"], state["best"]
        if centroids is not None:
            centroids.centroids = {k: v.to(device) for k, v in state["centroids"].items()}
    # a fixed batch of validation rows: the per-step held-out cosine
    held_batch = held.select(range(min(config.batch_size, held.examples))) if held else None

    def checkpoint(step: int) -> None:
        if ckpt_path is None:
            return
        save_checkpoint(
            ckpt_path,
            {
                "config": asdict(config),
                "rows_digest": digest,
                "step": step,
                "transform": transform.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "history": history,
                "selections": selections,
                "best": best,
                "centroids": centroids.centroids if centroids is not None else None,
            },
        )
        write_log(out, history, selections)

    def select(step: int) -> None:
        """Score the transform on the validation rows; keep it if it is the best
        admissible one so far."""
        nonlocal best
        if held is None or any(s["step"] == step for s in selections):
            return
        metrics = validation_metrics(config, transform, held, surrogate)
        selections.append({"step": step, **metrics})
        if out is not None:
            save_transform(transform, out / "trajectory" / f"step{step}.safetensors", fingerprint)
        key = "cos" if paper else "cmi"
        if metrics["admissible"] and (best is None or metrics[key] < best["metrics"][key]):
            best = {"step": step, "metrics": metrics, "state": _cpu_state(transform)}

    if start == 0:
        select(0)
    bar = tqdm(total=total, initial=start, disable=not progress, desc=f"train ({config.objective})")
    step = start
    for epoch in range(start // steps_per_epoch, config.epochs):
        order = _epoch_order(len(examples), config.seed, epoch)
        first = (step - epoch * steps_per_epoch) * config.batch_size
        for lo in range(first, len(order), config.batch_size):
            if stop_after is not None and step >= stop_after:
                bar.close()
                checkpoint(step)
                return _result(transform, history, selections, best, start)
            batch = rows.select(order[lo : lo + config.batch_size]).to(device)
            stats = _step(config, step, surrogate, transform, batch, centroids)
            optimizer.zero_grad(set_to_none=True)
            stats.pop("_loss").backward(inputs=params)
            optimizer.step()
            scheduler.step()
            step += 1
            if held_batch is not None and paper:
                stats["cos_heldout"] = _cosine(config, transform, held_batch.to(device), surrogate)
            stats["distance"] = transform.distance_from_identity()
            stats["lr"] = scheduler.get_last_lr()[0]
            history.append({"step": step, **stats})
            bar.update(1)
            bar.set_postfix({k: f"{v:.4g}" for k, v in stats.items() if k not in ("lr", "loss")})
            if step % select_every == 0 or step == total:
                select(step)
            if step % config.checkpoint_every == 0:
                checkpoint(step)
    bar.close()
    checkpoint(step)
    result = _result(transform, history, selections, best, start)
    if out is not None:
        save_transform(transform, out / "last.safetensors", fingerprint)
        save_transform(result.transform, out / "transform.safetensors", fingerprint)
    return result


def _cpu_state(transform: LogitTransform) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in transform.state_dict().items()}


def _result(transform, history, selections, best, start) -> TrainResult:
    """The selected transform (a copy) when there was a selection, else the last."""
    if best is None:
        return TrainResult(transform, history, selections, None, start)
    chosen = copy.deepcopy(transform)
    chosen.load_state_dict(best["state"])
    return TrainResult(chosen, history, selections, best["step"], start)


def _cosine(
    config: TrainConfig, transform: LogitTransform, batch: RowSet, surrogate: nn.Module
) -> float:
    """The seed's cosine of one batch, measured (no graph to the transform)."""
    probe = probe_from_residual(surrogate, batch.residual)
    with torch.no_grad():
        t = transform.apply_fp32(batch.logits)
    cos = gradient_cosine(batch.logits, t, batch.labels, probe, config.alpha, create_graph=False)
    return float(cos.detach())


def _check_finite(outputs: Tensor, loss: float, where: str) -> None:
    """A diverged run is said as such (not later as "logits contain +inf" of
    the outputs CMI is measured on)."""
    if not math.isfinite(loss) or bool((outputs.isnan() | outputs.isposinf()).any()):
        raise ValueError(
            f"training diverged: the transform's outputs or its loss {where} are not finite "
            "(lower --lr)"
        )


def validation_metrics(
    config: TrainConfig, transform: LogitTransform, held: RowSet, surrogate: nn.Module | None
) -> dict[str, Any]:
    """What the selection rule reads, on validation rows: the seed's cosine (mean
    over batches of ``batch_size`` examples), CMI, top-1 agreement, next-token and
    multiple-choice accuracy raw and purified, and whether the rule admits it."""
    device = next(transform.parameters()).device
    with torch.no_grad():
        purified = purify(held.logits.to(device), transform).cpu()
    _check_finite(purified, 0.0, "on the validation rows")
    raw, pur = scores(held, held.logits, with_cmi=False), scores(held, purified, with_cmi=False)
    out: dict[str, Any] = {
        "top1_agreement": float((purified.argmax(1) == held.logits.argmax(1)).float().mean()),
        "cmi": float(cmi(purified, held.labels)),  # purify has divided by τ
    }
    for k in raw:
        out[f"{k}_raw"], out[f"{k}_purified"] = raw[k], pur[k]
    if surrogate is not None and held.residual is not None:
        step = config.batch_size
        cosines = [
            _cosine(
                config, transform, held.select(range(i, min(i + step, held.examples))), surrogate
            )
            for i in range(0, held.examples, step)
        ]
        out["cos"] = sum(cosines) / len(cosines)
    else:
        out["cos"] = float("nan")
    kept = all(pur[k] >= raw[k] - ACCURACY_BUDGET for k in raw)
    out["admissible"] = bool(kept and out["top1_agreement"] >= MIN_TOP1)
    return out


def _step(
    config: TrainConfig,
    step: int,
    surrogate: nn.Module | None,
    transform: LogitTransform,
    batch: RowSet,
    centroids: StreamingCentroids | None,
) -> dict[str, Any]:
    """One batch's loss (under ``_loss``) and its logged terms."""
    z, labels = batch.logits, batch.labels
    if config.objective == "paper":
        lam = 0.0 if step < config.cos_warmup else config.lam
        probe = probe_from_residual(surrogate, batch.residual)
        loss, stats = gradient_misalignment_loss(
            z, labels, transform, probe, lam, config.alpha, config.utility, return_stats=True
        )
    else:
        fused_ce = config.utility == "ce"  # the kernels' own CE; other utilities on T(z)
        loss, stats = anti_distillation_loss(
            z,
            labels,
            transform,
            config.lambda_cmi,
            config.lambda_ce if fused_ce else 0.0,
            config.lambda_kl,
            config.temperature,
            config.estimator,
            state=centroids,
            return_stats=True,
        )
        if not fused_ce:
            u = utility_loss(transform.apply_fp32(z), z, labels, config.utility)
            loss = loss + config.lambda_ce * u
            stats["ce"] = float(u.detach())
        stats["utility"] = stats.pop("ce")
    value = float(loss.detach())
    with torch.no_grad():
        t = transform.apply_fp32(z)
        _check_finite(t, value, f"at step {step}")
        stats["top1"] = float((t.argmax(-1) == z.argmax(-1)).float().mean())
    return {"_loss": loss, "loss": value, **stats}


def write_log(out: Path, history: list[dict], selections: list[dict]) -> None:
    """``train_log.jsonl`` (a line per step, then a line per selection point)
    and ``training.png`` (the curves a person reads)."""
    lines = [json.dumps({"kind": "step", **h}) for h in history]
    lines += [json.dumps({"kind": "select", **s}) for s in selections]
    atomic_write(out / "train_log.jsonl", lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    if history:
        plot_training(history, selections, out / "training.png")


def plot_training(history: list[dict], selections: list[dict], path: Path) -> None:
    """The training curves as a PNG, the steps the selection rule kept marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    panels = [
        ("the seed's cosine", ["cos", "cos_heldout"]),
        ("top-1 agreement", ["top1"]),
        ("utility term", ["utility"]),
        ("‖T − I‖", ["distance"]),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.4))
    for ax, (title, keys) in zip(axes, panels, strict=True):
        for key in keys:
            if key in history[0]:
                ax.plot(steps, [h[key] for h in history], label=key, lw=1)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
    chosen = [s for s in selections if s.get("admissible")]
    if selections and not math.isnan(selections[0].get("cos", float("nan"))):
        axes[0].scatter(
            [s["step"] for s in selections],
            [s["cos"] for s in selections],
            c=["tab:green" if s["admissible"] else "tab:red" for s in selections],
            s=14,
            zorder=3,
            label="validation (green: admissible)",
        )
        axes[1].scatter(
            [s["step"] for s in selections], [s["top1_agreement"] for s in selections], s=14, c="k"
        )
    axes[1].axhline(MIN_TOP1, color="tab:red", lw=0.8, ls="--")
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(fontsize=7)
    fig.suptitle(f"{len(chosen)} of {len(selections)} validation points admissible", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
