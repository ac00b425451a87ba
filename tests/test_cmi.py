import math

import pytest
import torch

from cmiguard import StreamingCentroids, cmi
from cmiguard.kernels.reference import label_groups
from tests.conftest import random_logits


def direct_cmi(logits, labels, temperature=1.0):
    """The textbook formula, row by row, in float64, over labels seen at least twice."""
    p = torch.softmax(logits.double() / temperature, -1)
    total, n = 0.0, 0
    for y in labels.unique().tolist():
        idx = (labels == y).nonzero().flatten()
        if y == -100 or len(idx) < 2:
            continue
        q = p[idx].mean(0)
        for i in idx:
            terms = torch.where(p[i] > 0, p[i] * (p[i].log() - q.log()), 0.0)
            total += float(terms.sum())
            n += 1
    return total / n


def test_identical_rows_per_label_give_zero():
    base = random_logits(2, 40)
    logits = base[[0, 0, 0, 1, 1]]
    assert cmi(logits, torch.tensor([3, 3, 3, 9, 9])).item() == pytest.approx(0.0, abs=1e-6)


def test_hand_made_two_point_case():
    # Two rows of one label: p1 = (1, 0) and p2 = (0, 1) (nearly), Q = (1/2, 1/2):
    # each KL is log 2.
    logits = torch.tensor([[30.0, -30.0], [-30.0, 30.0]])
    assert cmi(logits, torch.tensor([1, 1])).item() == pytest.approx(math.log(2), rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_matches_direct_formula(temperature):
    logits = random_logits(23, 31, seed=4)
    logits[2, 5] = float("-inf")
    labels = torch.tensor(
        [1, 2, 1, 2, 3, 1, -100, 4] + [5, 5, 6, 6, 6, 7, 7, 1, 2, 3, 9, 9, 9, 30, 0]
    )
    got = cmi(logits, labels, temperature=temperature).item()
    assert got == pytest.approx(direct_cmi(logits, labels, temperature), rel=1e-5)


def test_singletons_and_ignored_rows_are_left_out():
    rows, group, labels, counts = label_groups(torch.tensor([4, 4, 7, -100, 2, 2, 2]))
    assert rows.tolist() == [0, 1, 4, 5, 6]
    assert labels.tolist() == [2, 4] and counts.tolist() == [3, 2]
    assert group.tolist() == [1, 1, 0, 0, 0]
    assert cmi(random_logits(3, 5), torch.tensor([0, 1, 2])).item() == 0.0


def test_streaming_starts_exact_then_uses_moving_average():
    a, b = random_logits(8, 20, seed=1), random_logits(8, 20, seed=2)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    state = StreamingCentroids(20, momentum=0.5)
    first = cmi(a, labels, estimator="streaming", state=state)
    assert first.item() == pytest.approx(cmi(a, labels).item(), rel=1e-6)
    second = cmi(b, labels, estimator="streaming", state=state)
    p_b = torch.softmax(b, -1)
    q = torch.softmax(a, -1).reshape(4, 2, 20).mean(1)  # after batch a: EMA = mean(a)
    want = (p_b * (p_b.log() - q.repeat_interleave(2, 0).log())).sum(-1).mean()
    assert second.item() == pytest.approx(want.item(), rel=1e-5)
    ema = 0.5 * q + 0.5 * p_b.reshape(4, 2, 20).mean(1)
    torch.testing.assert_close(state.centroids[0], ema[0])
    # 1 kept the first batch forever; 1.5 or -1 diverged
    for momentum in (1.0, 1.5, -1.0, float("nan")):
        with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\)"):
            StreamingCentroids(20, momentum=momentum)


def test_a_temperature_or_min_count_that_means_nothing_is_refused():
    # temperature 0, -1 or inf gave finite numbers (0 and inf the same one), min_count 0 a CMI
    from cmiguard import LowRankTransform, anti_distillation_loss

    z, labels = random_logits(8, 20), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    t = LowRankTransform(20, 2)
    for tau in (0.0, -1.0, math.inf, math.nan):
        for estimator in ("exact", "streaming"):
            with pytest.raises(ValueError, match="temperature must be finite and > 0"):
                cmi(z, labels, estimator, temperature=tau)
            with pytest.raises(ValueError, match="temperature must be finite and > 0"):
                anti_distillation_loss(z, labels, t, temperature=tau, estimator=estimator)
    with pytest.raises(ValueError, match="min_count must be >= 1, got 0"):
        cmi(z, labels, min_count=0)
    with pytest.raises(ValueError, match="min_count must be >= 1, got -1"):
        anti_distillation_loss(z, labels, t, min_count=-1)
