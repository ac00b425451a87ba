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
        (torch.tensor([0.0, 1.0]), TypeError, "integer token ids, got torch.float32"),
        (torch.tensor([True, False]), TypeError, "integer token ids"),
        (torch.tensor([0, 1, 2]), ValueError, r"shape \[2\]"),
        (torch.tensor([[0, 1]]), ValueError, r"shape \[2\]"),
    ],
)
def test_labels_are_checked(labels, error, match):
    with pytest.raises(error, match=match):
        cmi(torch.zeros(2, 5), labels)
    with pytest.raises(error, match=match):
        anti_distillation_loss(torch.zeros(2, 5), labels, LowRankTransform(5, 1))


def test_batched_rows_and_any_integer_labels_match_flat_int64_rows():
    """``[B, T, V]`` logits with ``[B, T]`` labels (a model's output and its
    shifted ids), int32 ids included, give what the flat ``[N, V]`` rows give."""
    torch.manual_seed(0)
    z = torch.randn(2, 6, 11)
    y = torch.tensor([[1, 2, 1, 2, -100, 3], [3, 1, 4, 4, 2, 1]])
    t = LowRankTransform(11, 2)
    torch.nn.init.normal_(t.b, std=0.3)
    flat_cmi = cmi(z.reshape(-1, 11), y.reshape(-1))
    assert flat_cmi > 0
    for labels in (y, y.int(), y.reshape(-1).short()):
        torch.testing.assert_close(cmi(z, labels), flat_cmi)
    flat = anti_distillation_loss(z.reshape(-1, 11), y.reshape(-1), t)
    (flat_grad,) = torch.autograd.grad(flat, t.b)
    batched = anti_distillation_loss(z, y.int(), t)
    (batched_grad,) = torch.autograd.grad(batched, t.b)
    torch.testing.assert_close(batched, flat)
    torch.testing.assert_close(batched_grad, flat_grad)
    with pytest.raises(ValueError, match=r"shape \[2, 6\] or \[12\]"):
        cmi(z, y[:, :5])


def test_a_transform_path_is_named_where_a_transform_is_taken(tmp_path):
    import datasets

    from cmiguard import fold_into_lm_head, purify_dataset, save_transform
    from cmiguard.serve.generation import PurifyLogitsProcessor

    path = str(tmp_path / "transform.safetensors")
    calls = [
        lambda: purify(torch.zeros(2, 3), path),
        lambda: anti_distillation_loss(torch.zeros(2, 3), torch.tensor([0, 1]), path),
        lambda: fold_into_lm_head(torch.nn.Linear(2, 3), path),
        lambda: save_transform(path, tmp_path / "copy.safetensors"),
        lambda: PurifyLogitsProcessor(path),
        lambda: purify_dataset(datasets.Dataset.from_dict({"logits": [[0.0] * 3]}), path),
    ]
    hint = r"got str \(read a file with cmiguard.load_transform\)"
    for call in calls:
        with pytest.raises(TypeError, match=hint):
            call()
    assert not (tmp_path / "copy.safetensors").exists()


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
