import math

import pytest
import torch
import torch.nn.functional as F

from cmiguard.attack.adaptive import (
    BlindInverse,
    fit_blind_inverse,
    fit_hidden_mass,
    fit_linear_inverse,
    floor_truncated,
    with_hidden_mass,
)
from cmiguard.attack.defenses import keep_top
from cmiguard.attack.evaluation import compiled_loss
from cmiguard.attack.losses import DIVERGENCES, bucket_hidden, distillation_loss, top_k_view
from cmiguard.tempering import fit_temperature, retemper


def direct(name, p, q):
    """Each divergence written out element by element, in float64."""
    p, q = p.double().tolist(), q.double().tolist()

    def kl(a, b):
        return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)

    def amari(a):
        return (sum(x**a * y ** (1 - a) for x, y in zip(p, q, strict=True)) - 1) / (a * (a - 1))

    def mix(w, a, b):
        return [w * x + (1 - w) * y for x, y in zip(a, b, strict=True)]

    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "alphanet":
        return max(amari(0.1), amari(0.9))
    if name == "abkd":
        a, b = 0.1, 0.8
        s = sum(
            x**a * y**b - a / (a + b) * x ** (a + b) - b / (a + b) * y ** (a + b)
            for x, y in zip(p, q, strict=True)
        )
        return -s / (a * b)
    if name == "skew_kl":
        return kl(p, mix(0.1, p, q))
    if name == "skew_reverse_kl":
        return kl(q, mix(0.1, q, p))
    if name == "gjsd":
        m = mix(0.5, p, q)
        return 0.5 * kl(p, m) + 0.5 * kl(q, m)
    if name == "total_variation":
        return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))
    raise KeyError(name)


@pytest.mark.parametrize("name", list(DIVERGENCES))
def test_divergences_match_direct_formulas(name):
    gen = torch.Generator().manual_seed(1)
    zp, zq = torch.randn(4, 9, generator=gen) * 2, torch.randn(4, 9, generator=gen) * 2
    log_p, log_q = zp.log_softmax(-1), zq.log_softmax(-1)
    got = DIVERGENCES[name](log_p, log_q)
    for i in range(4):
        assert got[i].item() == pytest.approx(
            direct(name, log_p[i].exp(), log_q[i].exp()), rel=1e-4, abs=1e-6
        )
    same = DIVERGENCES[name](log_p, log_p)
    assert same.abs().max().item() < 1e-5
    assert (got > 0).all()


def test_distillation_loss_mixes_sft_and_kd():
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(5, 11, generator=gen), torch.randn(5, 11, generator=gen)
    labels = torch.tensor([1, 2, -100, 4, 5])
    got = distillation_loss(s, t.log_softmax(-1), labels, "forward_kl", alpha=0.5, temperature=2.0)
    v = labels != -100
    kd = F.kl_div(
        (s[v] / 2).log_softmax(-1),
        (t[v] / 2).log_softmax(-1),
        log_target=True,
        reduction="batchmean",
    )
    want = 0.5 * F.cross_entropy(s, labels, ignore_index=-100) + 0.5 * 4 * kd
    assert got.item() == pytest.approx(want.item(), rel=1e-5)


def test_top_k_attack_sees_only_renormalised_top_k():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(3, 50, generator=gen), torch.randn(3, 50, generator=gen)
    values, ids = top_k_view(t.log_softmax(-1), 5)
    assert torch.allclose(values.exp().sum(-1), torch.ones(3))
    labels = torch.tensor([0, 1, 2])
    got = distillation_loss(s, t.log_softmax(-1), labels, "forward_kl", top_k=5)
    q = s.gather(1, ids).log_softmax(-1)
    kd = (values.exp() * (values - q)).sum(-1).mean()
    assert got.item() == pytest.approx(
        (0.5 * F.cross_entropy(s, labels) + 0.5 * kd).item(), rel=1e-5
    )


def test_retemper_inverts_a_serving_temperature():
    z = torch.randn(4, 30) * 3
    purified = (z / 3.2).log_softmax(-1)
    torch.testing.assert_close(retemper(purified, 3.2), z.log_softmax(-1), rtol=1e-5, atol=1e-5)


def test_unknown_attack():
    with pytest.raises(ValueError, match="unknown attack"):
        distillation_loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([0]), "wasserstein")


def test_fit_temperature_finds_a_served_temperature_blind():
    """Labels drawn from softmax(z) make τ = 1 the calibrated choice for raw
    logits; serving softmax(z / 3) must then be undone by τ ≈ 3."""
    gen = torch.Generator().manual_seed(4)
    z = torch.randn(4000, 30, generator=gen) * 2
    labels = torch.multinomial(z.softmax(-1), 1, generator=gen).squeeze(1)
    labels[::7] = -100
    assert fit_temperature(z.log_softmax(-1), labels) == pytest.approx(1.0, rel=0.08)
    assert fit_temperature((z / 3).log_softmax(-1), labels) == pytest.approx(3.0, rel=0.08)
    with pytest.raises(ValueError, match="finite log-prob"):
        fit_temperature(torch.zeros(2, 3), torch.tensor([-100, -100]))


def test_fit_linear_inverse_undoes_a_linear_transform_of_the_logits():
    gen = torch.Generator().manual_seed(5)
    v, r = 40, 3
    a, b = torch.randn(v, r, generator=gen) * 0.2, torch.randn(v, r, generator=gen) * 0.2
    # centred columns make the map commute with softmax's shift invariance, so
    # raw log-probs are an exact linear function of served ones (otherwise the
    # row's mean logit, which softmax drops, leaks into the served output)
    a = a - a.mean(0)

    def serve(z):
        return ((z + (z @ a) @ b.T) / 2.5).log_softmax(-1)

    fit_z, new_z = torch.randn(300, v, generator=gen) * 3, torch.randn(50, v, generator=gen) * 3
    invert = fit_linear_inverse(serve(fit_z), fit_z, ridge=1e-6)
    torch.testing.assert_close(invert(serve(new_z)), new_z.log_softmax(-1), atol=1e-3, rtol=0)
    # the default ridge still recovers far more than re-tempering by the scale alone
    rough = fit_linear_inverse(serve(fit_z), fit_z)(serve(new_z))
    err = (rough - new_z.log_softmax(-1)).abs().max()
    assert err < 0.05 * (serve(new_z) - new_z.log_softmax(-1)).abs().max()
    with pytest.raises(ValueError, match="pairs"):
        fit_linear_inverse(torch.zeros(3, 4), torch.zeros(3, 5))


def test_blind_inverse_applies_its_formula():
    """The returned map is ``log_softmax(s·x + (x A) Bᵀ)`` of the centred rows."""
    gen = torch.Generator().manual_seed(8)
    inverse = BlindInverse(2.5, torch.randn(6, 2, generator=gen), torch.randn(6, 2, generator=gen))
    served = torch.randn(4, 6, generator=gen).log_softmax(-1)
    x = served - served.mean(-1, keepdim=True)
    want = (2.5 * x + (x @ inverse.a) @ inverse.b.T).log_softmax(-1)
    torch.testing.assert_close(inverse(served), want)


def test_blind_inverse_finds_a_temperature_and_undoes_a_low_rank_map_blind():
    """Labels drawn from softmax(z): the raw logits are the calibrated ones, so
    by ground-truth likelihood alone the attacker recovers a served
    temperature (as the re-temperer does) and then most of what a low-rank
    map of the logits changed, which a scale cannot."""
    gen = torch.Generator().manual_seed(9)
    v = 30
    z = torch.randn(6000, v, generator=gen) * 2
    labels = torch.multinomial(z.softmax(-1), 1, generator=gen).squeeze(1)
    soft = fit_blind_inverse((z / 3).log_softmax(-1), labels, rank=2, steps=0)
    # its first move is the re-temperer's (on 80% of the rows)
    assert soft.scale == pytest.approx(fit_temperature((z / 3).log_softmax(-1), labels), rel=0.03)
    assert soft.scale == pytest.approx(3.0, rel=0.08)
    assert torch.count_nonzero(soft.b) == 0  # steps=0: the identity's low-rank part

    a = torch.randn(v, 1, generator=gen) / v**0.5
    a = a - a.mean()
    b = torch.randn(v, 1, generator=gen)
    served = (z + (z @ a) @ b.T).log_softmax(-1)
    inverse = fit_blind_inverse(served, labels, rank=1, steps=300, lr=3e-2)
    new_z = torch.randn(3000, v, generator=gen) * 2  # rows the attacker never fitted on
    new_labels = torch.multinomial(new_z.softmax(-1), 1, generator=gen).squeeze(1)
    new_served = (new_z + (new_z @ a) @ b.T).log_softmax(-1)

    def nll(logprobs):
        return float(F.nll_loss(logprobs, new_labels))

    raw, served_nll = nll(new_z.log_softmax(-1)), nll(new_served)
    blind = nll(inverse(new_served))
    retempered = nll(retemper(new_served, fit_temperature(served, labels)))
    assert blind < retempered - 0.5 * (retempered - raw)  # more than half the way back
    assert served_nll > retempered > blind >= raw - 0.02
    with pytest.raises(ValueError, match="two labelled rows"):
        fit_blind_inverse(served[:1], labels[:1])


def test_floor_truncated_keeps_shown_ratios_and_makes_every_divergence_finite():
    z = torch.randn(3, 12)
    shown = torch.full_like(z, float("-inf"))
    shown[0, :1] = 0.0  # top-1 only
    shown[1, :5] = z[1, :5].log_softmax(-1)  # top-5 truncation
    shown[2] = z[2].log_softmax(-1)  # nothing hidden
    got = floor_truncated(shown, mass=1e-3)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(3))
    assert torch.isfinite(got).all() and torch.equal(got[2], shown[2])
    torch.testing.assert_close(got[1, :5] - got[1, 0], shown[1, :5] - shown[1, 0])
    assert got[1, 5:].exp().sum().item() == pytest.approx(1e-3, rel=1e-4)
    assert torch.equal(floor_truncated(shown[2:]), shown[2:])  # untouched when nothing is hidden
    student = torch.randn(3, 12)
    for name in DIVERGENCES:
        assert torch.isfinite(DIVERGENCES[name](got, student.log_softmax(-1))).all(), name


def test_fit_hidden_mass_is_the_share_of_hidden_labels():
    """On rows that hide something, the smoothed share of labels hidden; labels
    drawn from softmax(z) make it the mean mass top-k hides."""
    z = torch.arange(6.0).repeat(4, 1)
    served = keep_top(z, 2).log_softmax(-1)
    served[3] = z[3].log_softmax(-1)  # hides nothing: not counted
    labels = torch.tensor([5, 0, -100, 0])  # one of two counted rows hides its label
    assert fit_hidden_mass(served, labels) == pytest.approx((1 + 1) / (2 + 2))
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(6000, 40, generator=gen) * 1.5
    labels = torch.multinomial(z.softmax(-1), 1, generator=gen).squeeze(1)
    hidden = 1 - z.softmax(-1).topk(5, dim=-1).values.sum(-1).mean().item()
    top5 = keep_top(z, 5).log_softmax(-1)
    assert fit_hidden_mass(top5, labels) == pytest.approx(hidden, rel=0.05)


def test_bucket_compares_hidden_tokens_as_one_bucket():
    gen = torch.Generator().manual_seed(8)
    z, s = torch.randn(3, 12, generator=gen) * 2, torch.randn(3, 12, generator=gen) * 2
    served = keep_top(z, 4).log_softmax(-1)
    served[2] = z[2].log_softmax(-1)  # nothing hidden
    target = with_hidden_mass(served, 0.3)
    torch.testing.assert_close(target[:2].exp().sum(-1), torch.full((2,), 0.7))
    assert torch.equal(target[2], served[2])
    log_p, log_q = bucket_hidden(target, s)
    torch.testing.assert_close(log_p.exp().sum(-1), torch.ones(3))
    torch.testing.assert_close(log_q.exp().sum(-1), torch.ones(3))
    shown = torch.isfinite(served[0])
    p = torch.cat([target[0][shown].exp(), torch.tensor([0.3])])
    q = s[0].softmax(-1)
    q = torch.cat([q[shown], q[~shown].sum(0, keepdim=True)])
    for name, divergence in DIVERGENCES.items():
        got = divergence(log_p, log_q)
        assert got[0].item() == pytest.approx(direct(name, p, q), rel=1e-4, abs=1e-6), name
        # a row that hides nothing is compared as the plain divergence is
        want = divergence(served[2:], s[2:].log_softmax(-1))
        assert got[2].item() == pytest.approx(want.item(), rel=1e-5, abs=1e-7), name
    # how the student spreads the bucket is the ground truth's business, not D's
    moved = s.clone()
    moved[0, ~shown] = moved[0, ~shown].flip(0)
    assert torch.equal(
        DIVERGENCES["forward_kl"](*bucket_hidden(target, moved))[0],
        DIVERGENCES["forward_kl"](log_p, log_q)[0],
    )
    labels = torch.tensor([0, 1, 2])
    for name in DIVERGENCES:
        student = s.clone().requires_grad_(True)
        distillation_loss(student, target, labels, name, bucket=True).backward()
        assert torch.isfinite(student.grad).all(), name
    with pytest.raises(ValueError, match="no temperature or top_k"):
        distillation_loss(s, target, labels, bucket=True, temperature=2.0)


def test_compiled_loss_matches_eager_across_row_counts():
    """The evaluation compiles the loss once with dynamic shapes; batches
    differ in row count and in which rows carry -100. (Compiled with symbolic
    floats, torch 2.11 and 2.12 fail this on the top-k batch.)"""
    compiled = compiled_loss()
    gen = torch.Generator().manual_seed(6)
    for n, top_k, bucket in ((7, None, False), (12, None, False), (9, 5, False), (8, None, True)):
        s = torch.randn(n, 64, generator=gen, requires_grad=True)
        t = (torch.randn(n, 64, generator=gen) * 3).log_softmax(-1)
        if bucket:
            t = with_hidden_mass(keep_top(t, 6).log_softmax(-1), 0.2)
        labels = torch.randint(0, 64, (n,), generator=gen)
        labels[1] = -100
        want = distillation_loss(s, t, labels, "gjsd", 0.5, 1.0, top_k, bucket)
        (grad_want,) = torch.autograd.grad(want, s)
        got = compiled(s, t, labels, "gjsd", 0.5, 1.0, top_k, bucket)
        (grad_got,) = torch.autograd.grad(got, s)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad_got, grad_want, rtol=1e-4, atol=1e-7)
