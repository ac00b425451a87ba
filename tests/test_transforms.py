import pytest
import torch

from cmiguard import DenseTransform, DiagLowRankTransform, LowRankTransform, purify
from cmiguard.kernels.reference import affine_logits, purify_reference
from tests.conftest import random_logits, trained_like

FAMILIES = [
    lambda v: LowRankTransform(v, 4),
    lambda v: DiagLowRankTransform(v, 4),
    lambda v: DenseTransform(v),
]


@pytest.mark.parametrize("make", FAMILIES)
@pytest.mark.parametrize("v", [1, 7, 1000])
def test_identity_at_init(make, v):
    z = random_logits(5, v)
    if v > 1:
        z[0, 0] = float("-inf")
    out = make(v)(z)
    assert torch.equal(torch.isneginf(out), torch.isneginf(z))
    finite = torch.isfinite(z)
    assert torch.allclose(out[finite], z[finite], atol=1e-5 * max(1.0, v**0.5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_purify_identity_returns_input(dtype):
    z = random_logits(17, 301).to(dtype)
    out = purify(z, LowRankTransform(301, 3))
    assert out.dtype == dtype and out.shape == z.shape
    torch.testing.assert_close(
        out.float(), z.float(), rtol=0, atol=1e-3 if dtype == torch.float32 else 0.1
    )


def test_purify_outputs_match_definitions():
    z = random_logits(9, 257).reshape(3, 3, 257)
    t = trained_like(LowRankTransform(257, 8))
    ref = affine_logits(z.reshape(-1, 257), **t.kernel_params()).detach().reshape(z.shape) / 2.0
    torch.testing.assert_close(purify(z, t, temperature=2.0), ref, rtol=1e-5, atol=1e-5)
    logp = purify(z, t, temperature=2.0, output="logprobs")
    torch.testing.assert_close(logp, ref.log_softmax(-1), rtol=1e-5, atol=1e-5)
    values, ids = purify(z, t, temperature=2.0, output="logprobs", top_k=5)
    want_v, want_i = ref.log_softmax(-1).topk(5)
    assert values.shape == (3, 3, 5)
    torch.testing.assert_close(values, want_v, rtol=1e-5, atol=1e-5)
    assert torch.equal(ids, want_i)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunking_does_not_change_the_result(dtype):
    z = random_logits(33, 129).to(dtype)
    z[4, 7] = float("-inf")
    p = trained_like(DiagLowRankTransform(129, 4)).kernel_params()
    whole = purify_reference(z, p, 1.5, "logprobs", chunk_rows=33)
    rowwise = purify_reference(z, p, 1.5, "logprobs", chunk_rows=1)
    assert whole.dtype == dtype
    torch.testing.assert_close(whole, rowwise, rtol=0, atol=1e-6)
    direct = affine_logits(z, **p).detach().div(1.5).log_softmax(-1).to(dtype)
    torch.testing.assert_close(whole, direct, rtol=1e-5, atol=1e-5)


def test_masked_logits_stay_masked_and_extremes_are_finite():
    z = torch.full((3, 50), float("-inf"))
    z[:, 7] = 1e4
    z[1, 3] = -1e4
    out = purify(z, trained_like(LowRankTransform(50, 2)), output="logprobs")
    assert torch.isneginf(out).sum() == torch.isneginf(z).sum()
    assert torch.isfinite(out[:, 7]).all()
    assert out[0, 7].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("make", FAMILIES)
def test_fold_equals_transform_of_head(make):
    v, d = 64, 16
    t = trained_like(make(v), scale=0.05)
    e, c, h = torch.randn(v, d), torch.randn(v), torch.randn(10, d)
    w2, c2 = t.fold(e, c)
    with torch.no_grad():
        torch.testing.assert_close(h @ w2.t() + c2, t(h @ e.t() + c), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("factor_dtype", [None, "bfloat16"])
def test_a_centered_transform_is_shift_invariant_and_folds(factor_dtype):
    """Rows read less their unmasked mean: logits, shifted logits and log-probs
    purify to one distribution, masked tokens and bf16 factors (whose rounded
    columns no longer sum to 0) included; an uncentred map gives another for
    log-probs. The map still folds."""
    v = 300
    z = random_logits(6, v, seed=4) * 4
    z[1, ::7] = float("-inf")  # masked tokens: a shift moves only the others
    z[2, 5:] = float("-inf")
    shifted = z + torch.linspace(-40, 40, 6).unsqueeze(1)
    log_p = torch.log_softmax(z, dim=-1)
    for centered in (False, True):
        t = LowRankTransform(v, 4, bias=True, centered=centered, factor_dtype=factor_dtype)
        t = trained_like(t, scale=0.3)
        with torch.no_grad():
            t.a.add_(0.5)  # column means far from zero: centring has work to do
        assert t.shift_invariant == centered
        want = purify(z, t, output="logprobs", temperature=1.3)
        for other in (shifted, log_p):
            got = purify(other, t, output="logprobs", temperature=1.3)
            if centered:
                torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
            else:
                assert (got - want)[torch.isfinite(want)].abs().max() > 0.1
    e, c, h = torch.randn(v, 16), torch.randn(v), torch.randn(10, 16)
    w2, c2 = t.fold(e, c)
    with torch.no_grad():
        torch.testing.assert_close(h @ w2.t() + c2, t(h @ e.t() + c), rtol=1e-4, atol=1e-4)
    assert "centered=True" in repr(t)


def test_purify_rejects_bad_arguments():
    t = LowRankTransform(10, 2)
    for tau in (0.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            purify(torch.zeros(2, 10), t, temperature=tau)
        with pytest.raises(ValueError, match="temperature must be finite and > 0"):
            LowRankTransform(10, 2, temperature=tau)
    with pytest.raises(ValueError, match="guard_margin must be finite"):
        LowRankTransform(10, 2, guard_margin=float("inf"))
    with pytest.raises(ValueError, match="top_k"):
        purify(torch.zeros(2, 10), t, top_k=11)
    with pytest.raises(ValueError, match="output"):
        purify(torch.zeros(2, 10), t, output="probs")
    with pytest.raises(ValueError, match="unknown transform family"):
        from cmiguard import make_transform

        make_transform("sparse", 10)


def test_a_dense_map_too_large_to_hold_is_refused():
    """Named before anything is allocated (V² fp32 weights)."""
    from cmiguard.transforms import DenseTransform

    with pytest.raises(ValueError, match=r"16,385² weights \(1.0 GiB in fp32\)"):
        DenseTransform(16_385)
    assert DenseTransform(16).weight.shape == (16, 16)


def test_a_transform_pickled_before_the_serving_cache_still_purifies():
    t = trained_like(LowRankTransform(30, 2), scale=0.05)
    z = random_logits(3, 30)
    want = purify(z, t)
    del t._served  # as torch.load gives a module saved before the attribute existed
    torch.testing.assert_close(purify(z, t), want)
