"""Applying a transform to logits a serving stack already has, and measuring CMI."""

from __future__ import annotations

import torch
from torch import Tensor

from cmiguard.kernels import backend
from cmiguard.kernels.reference import (
    centroid_sums,
    cmi_reference,
    label_groups,
    purify_reference,
)
from cmiguard.transforms import LogitTransform, check_transform
from cmiguard.validation import (
    check_cmi_options,
    check_device,
    check_labels,
    check_logits,
    check_temperature,
    check_top_k,
)

OUTPUTS = ("logits", "logprobs")


def purify(
    logits: Tensor,
    transform: LogitTransform,
    temperature: float | None = None,
    output: str = "logits",
    top_k: int | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Purified logits ``T(z)/τ`` (or log-probs), same shape and dtype as ``logits``.

    ``temperature=None`` uses the transform's own (1.0 unless trained with one).
    A guarded transform (``guard_margin``) keeps every row's raw argmax on top.
    With ``top_k`` returns ``(values, token_ids)`` of the k largest entries
    only, as a logprobs API does, without materialising the full output.
    It serves outputs: no gradient flows back (``transform(logits)`` is the
    differentiable map). Give it the model's logits, not log-probs: ``T`` is
    not shift-invariant, so ``T(log p)`` is another distribution.
    """
    check_transform(transform)
    check_logits(logits, transform.vocab_size, scan=False)  # type and shape
    params = transform.served_params()
    # the fused kernels check the values as they write (no separate pass over the logits)
    fused = backend(logits) == "triton" and params.get("weight") is None
    has_mask = False if fused else check_logits(logits, transform.vocab_size)
    check_device(logits, transform)
    if output not in OUTPUTS:
        raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
    tau = check_temperature(transform.temperature if temperature is None else temperature)
    check_top_k(top_k, transform.vocab_size)
    flat = logits.reshape(-1, transform.vocab_size)
    if backend(flat) == "triton":
        from cmiguard.kernels.purify import purify_triton

        result = purify_triton(flat, params, tau, output, top_k, guard=transform.guard_margin)
    else:
        result = purify_reference(
            flat, params, tau, output, top_k, has_mask=has_mask, guard=transform.guard_margin
        )
    if top_k is not None:
        values, ids = result
        shape = (*logits.shape[:-1], top_k)
        return values.reshape(shape), ids.reshape(shape)
    return result.reshape(logits.shape)


def cmi(
    logits: Tensor,
    labels: Tensor,
    estimator: str = "exact",
    temperature: float = 1.0,
    min_count: int = 2,
    state: StreamingCentroids | None = None,
) -> Tensor:
    """Conditional mutual information ``I(X; P | Y)`` in nats (a scalar), over
    logits ``[..., V]`` and labels ``[...]`` (or flat ``[N]``).

    ``exact`` uses the class centroids of these rows; ``streaming`` uses the
    moving-average centroids in ``state`` (updated in place; labels it has not
    seen yet fall back to this batch's centroid). Rows labelled ``-100`` and
    rows whose label occurs fewer than ``min_count`` times are left out: a
    label seen once has zero CMI by construction.
    """
    check_logits(logits)
    labels = check_labels(labels, tuple(logits.shape[:-1]), logits.shape[-1])
    flat = logits.reshape(-1, logits.shape[-1])
    temperature = check_cmi_options(estimator, temperature, min_count)
    log_q = None
    if estimator == "streaming":
        state = state if state is not None else StreamingCentroids(flat.shape[-1])
        log_q = state.log_centroids(flat, labels, temperature, min_count)
    if backend(flat) == "triton":
        from cmiguard.kernels.cmi_loss import TritonObjectiveFunction

        with torch.no_grad():
            _, stats = TritonObjectiveFunction.apply(
                flat,
                None,
                None,
                None,
                None,
                flat,
                labels,
                log_q,
                1.0,
                0.0,
                0.0,
                temperature,
                min_count,
            )
        return stats[0]
    return cmi_reference(flat, labels, temperature, min_count, log_centroids=log_q)


class StreamingCentroids:
    """Per-label centroids kept across batches as an exponential moving average."""

    def __init__(self, vocab_size: int, momentum: float = 0.9) -> None:
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        # 1 would never update (the first batch forever); above it, or below 0, diverges
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.vocab_size = vocab_size
        self.momentum = momentum
        self.centroids: dict[int, Tensor] = {}

    def log_centroids(
        self, logits: Tensor, labels: Tensor, temperature: float = 1.0, min_count: int = 2
    ) -> Tensor:
        """``log Q`` per label group of this batch, then fold the batch into the average."""
        rows, group, group_labels, counts = label_groups(labels, min_count)
        sums = centroid_sums(logits.detach(), rows, group, counts.numel(), temperature)
        return self.fold(sums, group_labels, counts)

    def fold(self, sums: Tensor, group_labels: Tensor, counts: Tensor) -> Tensor:
        """:meth:`log_centroids` from the batch's per-group ``Σ softmax`` (as the
        kernels compute it without materialising the transformed logits)."""
        means = sums / counts.unsqueeze(1).float()
        used = torch.empty_like(means)
        for g, label in enumerate(group_labels.tolist()):
            old = self.centroids.get(label)
            used[g] = means[g] if old is None else old
            new = means[g] if old is None else self.momentum * old + (1 - self.momentum) * means[g]
            self.centroids[label] = new
        return used.clamp_min(torch.finfo(torch.float32).tiny).log()
