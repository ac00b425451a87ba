"""The argmax guard and the low-rank init options: definitions, kernels vs twin, files."""

import pytest
import torch

from cmiguard import (
    DiagLowRankTransform,
    LowRankTransform,
    anti_distillation_loss,
    fold_into_lm_head,
    load_transform,
    purify,
    save_transform,
)
from cmiguard.kernels.purify import purify_triton
from cmiguard.kernels.reference import argmax_guard, purify_reference
from cmiguard.train.models import tiny_model
from tests.conftest import random_logits, trained_like
from tests.test_kernels import (
    DEVICE,
    awkward_logits,
    close_to_truth,
    float64_truth,
    params_of,
)


def test_guard_lifts_the_raw_answer_by_the_margin_and_only_it():
    z = torch.tensor([[5.0, 1.0, 0.0], [0.0, 4.0, 1.0], [2.0, 0.0, float("-inf")]])
    t = torch.tensor([[1.0, 3.0, 2.0], [0.0, 9.0, 1.0], [-1.0, 1.0, float("-inf")]])
    out = argmax_guard(t, z, 0.5)
    want = torch.tensor(
        [[3.5, 3.0, 2.0], [0.0, 9.0, 1.0], [1.5, 1.0, float("-inf")]]  # lifted, kept, lifted
    )
    assert torch.equal(out, want)
    one = torch.tensor([[7.0]])
    assert torch.equal(argmax_guard(one, torch.tensor([[1.0]]), 2.0), one)
    in_place = t.clone()
    argmax_guard(in_place, z, 0.5, out=in_place)
    assert torch.equal(in_place, want)


def test_guard_gradient_flows_through_the_runner_up():
    z = torch.tensor([[5.0, 1.0, 0.0, -1.0]])
    t = torch.tensor([[1.0, 3.0, 2.0, 0.0]], requires_grad=True)
    weights = torch.tensor([[1.0, 10.0, 100.0, 1000.0]])
    (argmax_guard(t, z, 0.25) * weights).sum().backward()
    # t'_0 = t_1 + 0.25: t_0 gets nothing, t_1 gets its own weight plus t'_0's
    assert torch.equal(t.grad, torch.tensor([[0.0, 11.0, 100.0, 1000.0]]))


@pytest.mark.parametrize("make", [lambda v: LowRankTransform(v, 4), DiagLowRankTransform])
def test_a_guarded_transform_keeps_every_answer(make):
    z = random_logits(64, 300)
    transform = trained_like(make(300), scale=0.5)
    assert (transform(z).argmax(-1) != z.argmax(-1)).float().mean() > 0.5  # it moves answers
    transform.guard_margin = 1.0
    t = transform(z)
    j = z.argmax(-1, keepdim=True)
    gap = t.gather(1, j).squeeze(1) - t.scatter(1, j, float("-inf")).amax(-1)
    assert torch.equal(t.argmax(-1), z.argmax(-1))
    assert float(gap.min().detach()) >= 1.0 - 1e-4


@pytest.mark.parametrize("output", ["logits", "logprobs"])
def test_purify_twin_applies_the_guard_as_defined(output):
    z = random_logits(19, 257)
    z[3, 5] = float("-inf")
    transform = trained_like(LowRankTransform(257, 4, guard_margin=0.5), scale=0.3)
    want = argmax_guard(transform.apply_fp32(z).detach(), z, 0.5) / 1.5
    want = want.log_softmax(-1) if output == "logprobs" else want
    got = purify(z, transform, temperature=1.5, output=output)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    by_rows = purify_reference(z, transform.kernel_params(), 1.5, output, chunk_rows=4, guard=0.5)
    torch.testing.assert_close(by_rows, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("n", "v"), [(1, 1), (3, 7), (17, 1000), (3, 49152)])
@pytest.mark.parametrize("output", ["logits", "logprobs"])
def test_guarded_purify_kernel_matches_twin(n, v, output, path):
    transform = trained_like(DiagLowRankTransform(v, 5), scale=0.3 if v < 40_000 else 0.02)
    p = params_of(transform)
    z = awkward_logits(n, v)
    ours = purify_triton(z, p, 1.3, output, guard=0.75)
    twin = purify_reference(z, p, 1.3, output, guard=0.75)
    t64, magnitude = float64_truth(z, p, 1.0, "logits")
    truth = argmax_guard(t64, z, 0.75) / 1.3
    truth = truth.log_softmax(-1) if output == "logprobs" else truth
    close_to_truth(ours, twin, truth, magnitude, 1e-6)
    assert torch.equal(ours.argmax(-1), z.argmax(-1))


def test_guarded_purify_kernel_top_k_matches_twin(path):
    v = 5000
    p = params_of(trained_like(LowRankTransform(v, 8), scale=0.05))
    z = awkward_logits(5, v, seed=2)
    ours_v, ours_i = purify_triton(z, p, 1.0, "logprobs", top_k=10, guard=2.0)
    twin_v, twin_i = purify_reference(z, p, 1.0, "logprobs", top_k=10, guard=2.0)
    torch.testing.assert_close(ours_v, twin_v, rtol=1e-5, atol=1e-4)
    assert torch.equal(ours_i[:, 0], z.argmax(-1)) and torch.equal(ours_i, twin_i)


def test_guarded_objective_kernel_matches_twin(monkeypatch):
    z = awkward_logits(9, 300).cpu()
    labels = torch.tensor([0, 2, 1, 2, 5, 5, 7, -100, 1])  # row 0 is masked to token 0
    transform = trained_like(LowRankTransform(300, 3, guard_margin=0.5), scale=0.2).to(DEVICE)
    out = {}
    for name in ("triton", "torch"):
        monkeypatch.setenv("CMIGUARD_BACKEND", name)
        loss = anti_distillation_loss(z.to(DEVICE), labels.to(DEVICE), transform, lambda_kl=0.5)
        out[name] = (loss.detach(), torch.autograd.grad(loss, list(transform.parameters())))
    torch.testing.assert_close(out["triton"][0], out["torch"][0], rtol=1e-5, atol=1e-5)
    for ours, twin in zip(out["triton"][1], out["torch"][1], strict=True):
        torch.testing.assert_close(ours, twin, rtol=1e-4, atol=1e-5)


def test_guard_margin_is_saved_and_old_files_have_none(tmp_path):
    guarded = trained_like(LowRankTransform(50, 2, guard_margin=0.25))
    save_transform(guarded, tmp_path / "g.safetensors")
    assert load_transform(tmp_path / "g.safetensors").guard_margin == 0.25
    save_transform(LowRankTransform(50, 2), tmp_path / "plain.safetensors")
    assert load_transform(tmp_path / "plain.safetensors").guard_margin is None
    with pytest.raises(ValueError, match="guard_margin"):
        LowRankTransform(50, 2, guard_margin=-1.0)


def test_a_guarded_transform_is_not_folded():
    with pytest.raises(ValueError, match="argmax guard"):
        fold_into_lm_head(tiny_model(64), LowRankTransform(64, 2, guard_margin=0.0))


def test_init_options_choose_which_factor_starts_at_zero():
    lora, seed = LowRankTransform(500, 8, init="lora"), LowRankTransform(500, 8, init="seed")
    std = {name: float(p.detach().std()) for name, p in (("lora.a", lora.a), ("seed.b", seed.b))}
    assert torch.count_nonzero(lora.b) == 0 and std["lora.a"] == pytest.approx(1, rel=0.05)
    assert torch.count_nonzero(seed.a) == 0 and std["seed.b"] == pytest.approx(1, rel=0.05)
    z = random_logits(4, 500)
    nudged = LowRankTransform(500, 8, init="seed", init_scale=1e-3)
    assert float(nudged.a.detach().std()) == pytest.approx(1e-3, rel=0.05)
    with torch.no_grad():
        assert 0 < float((nudged(z) - z).abs().max()) < 1.0
        for t in (lora, seed):
            assert torch.equal(t(z), z)
    with pytest.raises(ValueError, match="init must be one of"):
        LowRankTransform(10, 2, init="literal")


def test_seed_init_gradients_are_the_closed_form():
    """At A = 0 the reading factor's gradient is ``zᵀ G B`` and the writing
    factor's is 0 (``u = zA = 0``), for ``G = ∂L/∂T(z)``; LoRA's order is the mirror."""
    z = random_logits(6, 40)
    g = torch.randn(6, 40)
    for init in ("seed", "lora"):
        t = LowRankTransform(40, 3, init=init)
        (t(z) * g).sum().backward()
        a, b = t.a.detach(), t.b.detach()
        torch.testing.assert_close(t.a.grad, z.T @ g @ b)
        torch.testing.assert_close(t.b.grad, g.T @ (z @ a))
        zero = t.b.grad if init == "seed" else t.a.grad
        assert torch.count_nonzero(zero) == 0


def test_bf16_factors_round_the_same_on_every_path(tmp_path, monkeypatch):
    """factor_dtype='bfloat16': the kernels read A and B in bf16 (half their
    traffic), the twin and fold use the same rounded values, the fp32
    parameters stay the masters, and the file keeps the setting."""
    v = 1000
    fp32 = trained_like(LowRankTransform(v, 8), scale=0.05)
    half = LowRankTransform(v, 8, factor_dtype="bfloat16")
    half.load_state_dict(fp32.state_dict())
    z = awkward_logits(7, v)
    rounded = {k: (p.detach().bfloat16().float() if k in "ab" else p) for k, p in
               fp32.kernel_params().items()}  # fmt: skip
    want = purify_reference(z, rounded, 1.3, "logprobs")
    twin = purify(z, half.to(DEVICE), temperature=1.3, output="logprobs")
    torch.testing.assert_close(twin, want, rtol=0, atol=1e-6)
    assert not torch.allclose(twin, purify(z, fp32.to(DEVICE), temperature=1.3, output="logprobs"))
    ours = purify_triton(z, params_of(half), 1.3, "logprobs")
    assert params_of(half)["a"].dtype == torch.bfloat16
    t64, magnitude = float64_truth(z, rounded, 1.3, "logprobs")
    close_to_truth(ours, want, t64, magnitude, 1e-6)
    half.zero_grad()
    purify_reference(z, half.kernel_params(), 1.0, "logits")  # no grad: detached
    loss = half(z.cpu().clamp_min(-50)).sum()
    loss.backward()
    assert half.b.grad.dtype == torch.float32 and half.b.dtype == torch.float32
    save_transform(half, tmp_path / "h.safetensors")
    assert load_transform(tmp_path / "h.safetensors").factor_dtype == "bfloat16"
    with pytest.raises(ValueError, match="factor_dtype"):
        LowRankTransform(10, 2, factor_dtype="int8")
