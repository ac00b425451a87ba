import math

import pytest
import torch
import torch.nn.functional as F

from cmiguard.attacks import DIVERGENCES, distillation_loss, retemper, top_k_view


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
