import pytest
import torch

from cmiguard import LowRankTransform, anti_distillation_loss, cmi, purify


@pytest.mark.parametrize(
    ("logits", "error", "match"),
    [
        (torch.tensor([[0.0, float("nan"), 1.0]]), ValueError, "NaN"),
        (torch.tensor([[0.0, float("inf"), 1.0]]), ValueError, r"\+inf"),
        (torch.full((2, 3), float("-inf")), ValueError, "entirely -inf"),
        (torch.zeros(2, 4), ValueError, "vocab_size=3"),
        (torch.zeros(2, 3, dtype=torch.int64), TypeError, "float32"),
        (torch.zeros(0, 3), ValueError, "empty"),
        ([[0.0, 1.0, 2.0]], TypeError, "torch.Tensor"),
    ],
)
def test_purify_names_the_problem(logits, error, match):
    with pytest.raises(error, match=match):
        purify(logits, LowRankTransform(3, 1))


@pytest.mark.parametrize(
    ("labels", "error", "match"),
    [
        (torch.tensor([0, 5]), ValueError, "out of range"),
        (torch.tensor([0, -3]), ValueError, "out of range"),
        (torch.tensor([0, 1], dtype=torch.int32), TypeError, "int64"),
        (torch.tensor([0, 1, 2]), ValueError, r"shape \[2\]"),
    ],
)
def test_labels_are_checked(labels, error, match):
    with pytest.raises(error, match=match):
        cmi(torch.zeros(2, 5), labels)
    with pytest.raises(error, match=match):
        anti_distillation_loss(torch.zeros(2, 5), labels, LowRankTransform(5, 1))


def test_unknown_estimator():
    with pytest.raises(ValueError, match="estimator"):
        cmi(torch.zeros(2, 5), torch.tensor([0, 0]), estimator="bootstrap")


def test_label_on_a_masked_token_is_refused():
    z = torch.zeros(2, 5)
    z[1, 3] = float("-inf")
    with pytest.raises(ValueError, match="row 1: its label's logit is masked"):
        anti_distillation_loss(z, torch.tensor([0, 3]), LowRankTransform(5, 1))


def test_a_transform_on_another_device_is_named():
    """CPU logits with a transform elsewhere (the meta device stands in for a GPU)."""
    transform = LowRankTransform(3, 1).to("meta")
    with pytest.raises(ValueError, match="logits are on cpu but the transform is on meta"):
        purify(torch.zeros(2, 3), transform)
    with pytest.raises(ValueError, match="move it with .to\\('cpu'\\)"):
        anti_distillation_loss(torch.zeros(2, 3), torch.tensor([0, 0]), transform)
