import pytest
import torch
import torch.nn.functional as F

from cmiguard import (
    DiagLowRankTransform,
    LowRankTransform,
    SurrogateProbe,
    anti_distillation_loss,
    gradient_misalignment_loss,
)
from cmiguard.train.trainer import TrainConfig
from tests.conftest import random_logits, trained_like


def naive_objective(z, labels, t, lam_cmi, lam_ce, lam_kl, tau):
    """Direct autograd through every term; singleton labels and -100 left out of CMI."""
    tz = t(z)
    valid = labels != -100
    logp = torch.log_softmax(tz / tau, -1)
    p = logp.exp()
    cmi_sum, n = 0.0, 0
    for y in labels[valid].unique():
        idx = (labels == y).nonzero().flatten()
        if len(idx) < 2:
            continue
        q = p[idx].mean(0)
        terms = torch.where(p[idx] > 0, p[idx] * (logp[idx] - q.log()), 0.0)
        cmi_sum = cmi_sum + terms.sum()
        n += len(idx)
    ce = F.cross_entropy(tz, labels, ignore_index=-100)
    q = torch.softmax(z[valid], -1)
    log_s = torch.log_softmax(tz[valid], -1)
    kl = torch.where(q > 0, q * (q.log() - log_s), 0.0).sum() / valid.sum()
    return lam_cmi * cmi_sum / n + lam_ce * ce + lam_kl * kl


@pytest.mark.parametrize(
    "make", [lambda v: LowRankTransform(v, 3), lambda v: DiagLowRankTransform(v, 3)]
)
@pytest.mark.parametrize(("lams", "tau"), [((1.0, 1.0, 0.0), 1.0), ((2.0, 0.5, 0.7), 1.7)])
def test_objective_gradient_matches_naive_autograd(make, lams, tau):
    v = 37
    z = random_logits(12, v, seed=3)
    z[5, 2] = float("-inf")
    labels = torch.tensor([1, 1, 2, 2, 2, 5, -100, 7, 7, 30, 1, 8])
    t = trained_like(make(v), scale=0.02)
    ours = anti_distillation_loss(z, labels, t, *lams, temperature=tau)
    g_ours = torch.autograd.grad(ours, list(t.parameters()))
    ref = naive_objective(z, labels, t, *lams, tau)
    g_ref = torch.autograd.grad(ref, list(t.parameters()))
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_grad_output_scaling_is_applied():
    z, labels = random_logits(6, 11), torch.tensor([0, 0, 1, 1, 2, 2])
    t = trained_like(LowRankTransform(11, 2))
    g1 = torch.autograd.grad(anti_distillation_loss(z, labels, t), [t.b])[0]
    g3 = torch.autograd.grad(3.0 * anti_distillation_loss(z, labels, t), [t.b])[0]
    torch.testing.assert_close(g3, 3 * g1)


def test_streaming_objective_reports_terms():
    z, labels = random_logits(6, 11), torch.tensor([0, 0, 1, 1, 2, 2])
    loss, stats = anti_distillation_loss(
        z, labels, LowRankTransform(11, 2), estimator="streaming", return_stats=True
    )
    assert set(stats) == {"cmi", "ce", "kl"}
    assert loss.item() == pytest.approx(stats["cmi"] + stats["ce"], rel=1e-6)


def linear_surrogate(n, v, d, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen)
    w = torch.randn(v, d, generator=gen).mul(0.3).requires_grad_(True)
    return h, w, SurrogateProbe(logits=lambda: h @ w.t(), params=[w])


def test_misalignment_matches_closed_form():
    """For a linear surrogate head the student gradient is (softmax(s) − target)ᵀ h:
    build the cosine from that formula and compare value and gradient."""
    n, v, d, alpha = 10, 29, 6, 0.5
    z = random_logits(n, v, seed=5)
    labels = torch.tensor([0, 3, 3, 8, -100, 1, 2, 2, 9, 4])
    t = trained_like(LowRankTransform(v, 4), scale=0.05)
    h, w, probe = linear_surrogate(n, v, d)
    ours = gradient_misalignment_loss(z, labels, t, probe, lam=0.8, alpha=alpha)
    g_ours = torch.autograd.grad(ours, [t.a, t.b])

    valid = labels != -100
    s = torch.softmax(h @ w.detach().t(), -1)
    onehot = F.one_hot(labels.clamp_min(0), v).float() * valid[:, None]

    def grad_w(teacher_p):
        sft = (s - onehot) * valid[:, None] / valid.sum()
        kd = (s - teacher_p) * valid[:, None] / valid.sum()
        return ((1 - alpha) * sft + alpha * kd).t() @ h

    tz = t(z)
    g, g2 = grad_w(torch.softmax(z, -1)), grad_w(torch.softmax(tz, -1))
    cos = (g * g2).sum() / (g.norm() * g2.norm())
    ref = F.cross_entropy(tz, labels, ignore_index=-100) + 0.8 * cos
    g_ref = torch.autograd.grad(ref, [t.a, t.b])
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(g_ours, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


def test_misalignment_checks_shapes_and_alpha():
    h, w, probe = linear_surrogate(4, 9, 3)
    with pytest.raises(ValueError, match="surrogate logits"):
        gradient_misalignment_loss(
            random_logits(5, 9), torch.zeros(5, dtype=torch.long), LowRankTransform(9, 2), probe
        )
    # at alpha 0 the cosine is 1 whatever the transform (no signal); past 1, SFT is negative
    h, w, probe = linear_surrogate(5, 9, 3)
    for alpha in (0.0, 1.5, -0.5):
        with pytest.raises(ValueError, match=r"alpha \(the KD share .*\) must be in \(0, 1\]"):
            gradient_misalignment_loss(
                random_logits(5, 9), torch.zeros(5, dtype=torch.long), LowRankTransform(9, 2),
                probe, alpha=alpha,
            )  # fmt: skip
        with pytest.raises(ValueError, match="alpha"):
            TrainConfig(alpha=alpha)


def naive_cosine(z, labels, t_logits, probe, alpha):
    """The cosine as written: autograd of student_loss with the raw and the
    purified teacher, a loss graph over [N, V] each."""
    from cmiguard.train.objectives import student_loss

    student = probe.logits()
    g = torch.autograd.grad(
        student_loss(student, torch.softmax(z, -1), labels, alpha), probe.params, retain_graph=True
    )
    g2 = torch.autograd.grad(
        student_loss(student, torch.softmax(t_logits, -1), labels, alpha),
        probe.params,
        create_graph=True,
    )
    dot = sum((a * b).sum() for a, b in zip(g, g2, strict=True))
    return dot / (
        torch.sqrt(sum((a**2).sum() for a in g)) * torch.sqrt(sum((b**2).sum() for b in g2))
    )


def test_closed_form_cosine_equals_autograd_through_a_real_surrogate():
    """Through a tiny Llama's last MLP, norm and head (not a linear head): the
    closed-form δ and the two VJPs give the cosine and its gradient that
    autograd of student_loss gives."""
    from cmiguard.train.models import probe_from_residual, tiny_model
    from cmiguard.train.objectives import gradient_cosine

    model = tiny_model(64, seed=2)
    residual = torch.randn(12, 64, generator=torch.Generator().manual_seed(3))
    z = random_logits(12, 64, seed=4)
    labels = torch.tensor([1, 5, 5, -100, 9, 9, 0, 3, 3, 3, 60, 2])
    t = trained_like(LowRankTransform(64, 3), scale=0.3)
    probe = probe_from_residual(model, residual)
    ours = gradient_cosine(z, t.apply_fp32(z), labels, probe, 0.3)
    ref = naive_cosine(z, labels, t.apply_fp32(z), probe, 0.3)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    assert ours.item() < 0.999  # the map moved it, so the check has something to compare
    for a, b in zip(
        torch.autograd.grad(ours, [t.a, t.b]), torch.autograd.grad(ref, [t.a, t.b]), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_utility_terms_match_their_definitions():
    from cmiguard.train.objectives import utility_loss

    z = random_logits(8, 30, seed=6)
    t = random_logits(8, 30, seed=7)
    labels = z.argmax(-1).clone()
    labels[[1, 4]] = (labels[[1, 4]] + 1) % 30  # two rows the teacher gets wrong
    labels[6] = -100
    keep = torch.tensor([0, 2, 3, 5, 7])
    valid = labels != -100
    want = {
        "ce": F.cross_entropy(t[valid], labels[valid]),
        "ce_correct": F.cross_entropy(t[keep], labels[keep]),
        "teacher_ce": F.cross_entropy(t[valid], z[valid].argmax(-1)),
        "kl": (
            torch.softmax(z[valid], -1)
            * (torch.log_softmax(z[valid], -1) - torch.log_softmax(t[valid], -1))
        )
        .sum(-1)
        .mean(),
    }
    for kind, value in want.items():
        assert utility_loss(t, z, labels, kind).item() == pytest.approx(value.item(), rel=1e-5)
    assert utility_loss(z, z, labels, "kl").item() == pytest.approx(0.0, abs=1e-6)
    none_right = torch.where(valid, (z.argmax(-1) + 1) % 30, -100)
    assert utility_loss(t, z, none_right, "ce_correct").item() == 0.0
    with pytest.raises(ValueError, match="utility must be one of"):
        utility_loss(t, z, labels, "accuracy")


def test_without_the_cosine_only_the_utility_trains():
    """λ = 0 (the warm-up): the loss and its gradient are the utility term's."""
    from cmiguard.train.objectives import utility_loss

    n, v, d = 10, 29, 6
    z = random_logits(n, v, seed=5)
    labels = torch.tensor([0, 3, 3, 8, -100, 1, 2, 2, 9, 4])
    t = trained_like(LowRankTransform(v, 4, init_scale=0.01, guard_margin=0.5), scale=0.05)
    _, _, probe = linear_surrogate(n, v, d)
    loss, stats = gradient_misalignment_loss(
        z, labels, t, probe, lam=0.0, utility="teacher_ce", return_stats=True
    )
    want = utility_loss(t(z), z, labels, "teacher_ce")
    assert loss.item() == pytest.approx(want.item()) == pytest.approx(stats["utility"])
    assert 0 < stats["cos"] < 1
    for a, b in zip(
        torch.autograd.grad(loss, [t.a, t.b]), torch.autograd.grad(want, [t.a, t.b]), strict=True
    ):
        torch.testing.assert_close(a, b)
