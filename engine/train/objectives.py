"""Training objectives for the transform (the teacher is frozen).

``cmi``: the direct objective, ``λ_cmi·CMI + λ_ce·CE + λ_kl·KL`` (docs/DESIGN.md, "Objectives").
``paper``: the seed paper's gradient misalignment, ``CE + λ·cos(g, g′)``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from cmiguard.kernels import backend
from cmiguard.kernels.reference import IGNORE_INDEX, ObjectiveFunction
from cmiguard.purify import StreamingCentroids
from cmiguard.transforms import LogitTransform, check_transform
from cmiguard.validation import (
    check_cmi_options,
    check_device,
    check_labels,
    check_logits,
)


def _triton_objective(logits, labels, transform, params, estimator, state, lams):
    """The fused-kernel path (``params``: the transform's ``kernel_params()``):
    operands instead of a materialised ``T(z)``; for a low-rank transform on
    logits that need no gradient, the two-pass backward
    (:mod:`cmiguard.kernels.objective_backward`)."""
    from cmiguard.kernels.cmi_loss import (
        ProjectFunction,
        TritonObjectiveFunction,
        label_centroid_sums,
    )
    from cmiguard.kernels.objective_backward import fused_objective
    from cmiguard.kernels.purify import transform_operands

    # the guard is not affine: the kernels take the guarded T(z) as given, autograd the rest
    given = params.get("weight") is not None or transform.guard_margin is not None
    x = transform.apply_fp32(logits) if given else None
    log_q = None
    if estimator == "streaming":
        state = state if state is not None else StreamingCentroids(transform.vocab_size)
        with torch.no_grad():
            # checked before the average moves: a bad batch leaves the state as it was
            ops = {"x": x.detach()} if given else transform_operands(logits, params, check=True)
            sums, group_labels, counts = label_centroid_sums(ops, logits, labels, *lams[3:])
        log_q = state.fold(sums, group_labels, counts)
    if given:
        u, b, scale, bias = None, None, None, None
    else:
        fused = fused_objective(logits, params, labels, log_q, lams)
        if fused is not None:
            return fused
        x, b, scale, bias = logits, params.get("b"), params.get("scale"), params.get("bias")
        u = None
        if params.get("a") is not None:
            u = ProjectFunction.apply(logits, params["a"], params.get("centered", False))
    return TritonObjectiveFunction.apply(x, u, b, scale, bias, logits, labels, log_q, *lams)


def _check_rows(
    logits: Tensor, labels: Tensor, transform: LogitTransform, scan: bool = True
) -> tuple[Tensor, Tensor]:
    """Validated logits ``[..., V]`` and labels ``[...]`` as flat ``[N, V]`` rows and
    ``[N]`` int64 labels, no label on a masked token (``scan=False``: the values are
    checked by the kernel that reads them)."""
    check_logits(logits, transform.vocab_size, scan=scan)
    check_device(logits, transform)
    labels = check_labels(labels, tuple(logits.shape[:-1]), transform.vocab_size)
    logits = logits.reshape(-1, transform.vocab_size)
    valid = labels != IGNORE_INDEX
    label_logit = logits[valid].gather(1, labels[valid].unsqueeze(1))
    if torch.isneginf(label_logit).any():
        row = int(valid.nonzero()[torch.isneginf(label_logit).squeeze(1)][0])
        raise ValueError(f"row {row}: its label's logit is masked (-inf), so CE is infinite")
    return logits, labels


def _transformed(
    logits: Tensor, labels: Tensor, transform: LogitTransform
) -> tuple[Tensor, Tensor, Tensor]:
    """Validated flat rows, their labels and ``T(z)`` in fp32 (guarded if the
    transform is), with the graph to the transform's parameters."""
    logits, labels = _check_rows(logits, labels, transform)
    return logits, labels, transform.apply_fp32(logits)


def anti_distillation_loss(
    logits: Tensor,
    labels: Tensor,
    transform: LogitTransform,
    lambda_cmi: float = 1.0,
    lambda_ce: float = 1.0,
    lambda_kl: float = 0.0,
    temperature: float = 1.0,
    estimator: str = "exact",
    state: StreamingCentroids | None = None,
    min_count: int = 2,
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """The direct CMI objective on teacher logits ``[..., V]`` and labels ``[...]``.

    ``CMI`` is over ``softmax(T(z)/τ)`` with per-label centroids (in-batch for
    ``exact``, the moving average in ``state`` for ``streaming``), ``CE`` is
    ``CE(T(z), y)`` and ``KL`` is ``KL(softmax(z) ‖ softmax(T(z)))``.
    """
    check_transform(transform)
    temperature = check_cmi_options(estimator, temperature, min_count)
    lams = (lambda_cmi, lambda_ce, lambda_kl, temperature, min_count)
    if backend(logits) == "triton":
        from cmiguard.kernels.objective_backward import fusable

        # the fused step checks the values as it reads them: no validation pass
        params = transform.kernel_params()  # (a centred A is built once a step)
        fused = transform.guard_margin is None and fusable(logits, params)
        logits, labels = _check_rows(logits, labels, transform, scan=not fused)
        loss, stats = _triton_objective(logits, labels, transform, params, estimator, state, lams)
    else:
        logits, labels, t = _transformed(logits, labels, transform)
        log_q = None
        if estimator == "streaming":
            state = state if state is not None else StreamingCentroids(transform.vocab_size)
            log_q = state.log_centroids(t.detach(), labels, temperature, min_count)
        loss, stats = ObjectiveFunction.apply(t, logits, labels, log_q, *lams)
    if return_stats:
        cmi_v, ce_v, kl_v = stats.tolist()
        return loss, {"cmi": cmi_v, "ce": ce_v, "kl": kl_v}
    return loss


@dataclass
class SurrogateProbe:
    """A frozen surrogate student seen through the layer whose gradient we compare.

    ``logits()`` returns the student's logits ``[N, V]`` for the same rows as
    the teacher logits, differentiable in ``params`` (its second-to-last layer).
    """

    logits: Callable[[], Tensor]
    params: list[Tensor]


def student_loss(
    student_logits: Tensor, teacher_probs: Tensor, labels: Tensor, alpha: float
) -> Tensor:
    """``(1−α)·SFT + α·KL(teacher ‖ student)`` (the KL's teacher entropy dropped:
    it has no gradient in the student)."""
    log_s = torch.log_softmax(student_logits.float(), dim=-1)
    valid = labels != IGNORE_INDEX
    sft = F.nll_loss(log_s, labels, ignore_index=IGNORE_INDEX)
    kd = -(teacher_probs[valid] * log_s[valid]).sum(-1).mean()
    return (1 - alpha) * sft + alpha * kd


UTILITIES = ("ce", "ce_correct", "teacher_ce", "kl")


def utility_loss(t: Tensor, z: Tensor, labels: Tensor, kind: str = "ce") -> Tensor:
    """What keeps the transform useful, on transformed logits ``t`` (raw ``z``):

    ``ce``: ``CE(t, y)`` on every labelled row (the seed's; on text the
    teacher is often wrong, and this teaches ``T`` to overrule it);
    ``ce_correct``: the same on the rows where ``argmax z = y`` only;
    ``teacher_ce``: ``CE(t, argmax z)``, the teacher's own answers;
    ``kl``: ``KL(softmax(z) ‖ softmax(t))``, the whole distribution.
    Means over the rows it covers (0 where it covers none).
    """
    if kind not in UTILITIES:
        raise ValueError(f"utility must be one of {UTILITIES}, got {kind!r}")
    valid = labels != IGNORE_INDEX
    if kind == "kl":
        log_t = torch.log_softmax(t[valid].float(), -1)
        p = torch.softmax(z[valid].float(), -1)
        return F.kl_div(log_t, p, reduction="sum") / valid.sum().clamp_min(1)
    answer = z.argmax(-1)
    target = {
        "ce": labels,
        "ce_correct": torch.where(answer == labels, labels, IGNORE_INDEX),
        "teacher_ce": torch.where(valid, answer, IGNORE_INDEX),
    }[kind]
    if not bool((target != IGNORE_INDEX).any()):
        return t.sum() * 0.0
    return F.cross_entropy(t.float(), target, ignore_index=IGNORE_INDEX)


def check_alpha(alpha: float) -> None:
    """The KD share of the surrogate student's loss: in (0, 1]. At 0 the student
    ignores the teacher, so g = g′ and the cosine is 1 whatever the transform."""
    if not 0 < alpha <= 1:
        raise ValueError(
            f"alpha (the KD share of the student's loss) must be in (0, 1], got {alpha}"
        )


def gradient_cosine(
    teacher_logits: Tensor,
    transformed: Tensor,
    labels: Tensor,
    surrogate: SurrogateProbe,
    alpha: float = 0.5,
    create_graph: bool = True,
) -> Tensor:
    """``cos(g, g′)``: the surrogate's gradients of :func:`student_loss` with the
    raw and with the purified teacher (``softmax(transformed)``).

    In closed form: with ``s`` the student's logits and ``n`` the labelled rows,
    ``∂ student_loss / ∂s = ((1−α)(softmax(s) − e_y) + α(softmax(s) − p)) / n``,
    so ``g = Jᵀδ`` and ``g′ = g + (α/n)·Jᵀ(p − p′)``: one vector-Jacobian
    product per gradient through the surrogate's last MLP and head, no loss
    graph over ``[N, V]``. ``g′`` is linear in the purified probabilities, so
    with ``create_graph`` the cosine is differentiable in the transform.
    """
    check_alpha(alpha)
    student = surrogate.logits()
    if student.shape != teacher_logits.shape:
        raise ValueError(
            f"surrogate logits {tuple(student.shape)} do not match teacher logits "
            f"{tuple(teacher_logits.shape)}"
        )
    valid = (labels != IGNORE_INDEX).unsqueeze(1)
    n = valid.sum().clamp_min(1)
    with torch.no_grad():
        p = torch.softmax(teacher_logits.float(), dim=-1)
        delta = torch.softmax(student.float(), dim=-1) - alpha * p
        safe = labels.clamp_min(0).unsqueeze(1)
        delta.scatter_add_(1, safe, torch.full_like(safe, alpha - 1, dtype=delta.dtype))
        delta = delta * valid / n
    g = torch.autograd.grad((delta * student).sum(), surrogate.params, retain_graph=True)
    change = alpha * (p - torch.softmax(transformed, dim=-1)) * valid / n
    diff = torch.autograd.grad(
        (change * student).sum(), surrogate.params, create_graph=create_graph
    )
    dot = sum((a * (a + b)).sum() for a, b in zip(g, diff, strict=True))
    norm_g = torch.sqrt(sum((a**2).sum() for a in g))
    norm_new = torch.sqrt(sum(((a + b) ** 2).sum() for a, b in zip(g, diff, strict=True)))
    return dot / (norm_g * norm_new).clamp_min(1e-12)


def gradient_misalignment_loss(
    teacher_logits: Tensor,
    labels: Tensor,
    transform: LogitTransform,
    surrogate: SurrogateProbe,
    lam: float = 1.0,
    alpha: float = 0.5,
    utility: str = "ce",
    return_stats: bool = False,
) -> Tensor | tuple[Tensor, dict[str, float]]:
    """``U(T(z)) + λ·cos(g, g′)``: the seed paper's objective (``U`` = CE by
    default; :func:`utility_loss`), the cosine from :func:`gradient_cosine`.
    With ``lam = 0`` (a utility-only warm-up) the cosine is only measured."""
    check_transform(transform)
    teacher_logits, labels, t = _transformed(teacher_logits, labels, transform)
    cos = gradient_cosine(teacher_logits, t, labels, surrogate, alpha, create_graph=lam != 0)
    u = utility_loss(t, teacher_logits, labels, utility)
    loss = u + lam * cos if lam != 0 else u
    if return_stats:
        return loss, {"utility": float(u.detach()), "cos": float(cos.detach())}
    return loss
