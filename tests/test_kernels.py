"""Triton kernels against their torch twins (interpreter on CPU, compiled on a GPU).

Tolerances follow cut-cross-entropy's rule: the kernel may be no further from
a float64 ground truth than the fp32 twin is, plus a small absolute slack.
"""

import copy
import os

import pytest
import torch

from cmiguard import (
    DenseTransform,
    DiagLowRankTransform,
    LowRankTransform,
    anti_distillation_loss,
    cmi,
    purify,
)
from cmiguard.kernels import TWIN_MAX_LOGITS, auto_backend, backend
from cmiguard.kernels.config import LaunchConfig, forced, launch_config, vocab_split
from cmiguard.kernels.purify import purify_triton
from cmiguard.kernels.reference import affine_logits, label_groups, purify_reference
from cmiguard.purify import StreamingCentroids
from tests.conftest import random_logits, trained_like

DEVICE = "cuda" if os.environ.get("CMIGUARD_TEST_COMPILED") else "cpu"
MAKERS = {
    "lowrank": lambda v: LowRankTransform(v, 5),
    # rows read less their unmasked mean; A's columns centred before the kernels read it
    "lowrank_centered": lambda v: LowRankTransform(v, 4, bias=True, centered=True),
    # ... and rounded to bf16, so that only the mean term keeps the map shift-invariant
    "lowrank_centered_bf16": lambda v: LowRankTransform(
        v, 4, centered=True, factor_dtype="bfloat16"
    ),
    "diag_lowrank": lambda v: DiagLowRankTransform(v, 3),
    "dense": lambda v: DenseTransform(v),
}


@pytest.fixture
def force(monkeypatch):
    def use(name):
        monkeypatch.setenv("CMIGUARD_BACKEND", name)

    return use


def awkward_logits(n, v, seed=0):
    """Random logits with a row masked to one token, ±1e4 entries and masked tokens."""
    z = random_logits(n, v, seed)
    if v > 1:
        z[0, 1:] = float("-inf")
        z[-1, v // 2] = 1e4
        z[-1, 0] = -1e4
        z[n // 2, (v - 1) // 3] = float("-inf")
    return z.to(DEVICE)


def params_of(t):
    return {
        k: (p.detach().to(DEVICE) if isinstance(p, torch.Tensor) else p)
        for k, p in t.kernel_params().items()
    }


def close_to_truth(ours, twin, truth, magnitude, tol):
    """|truth − ours| <= |truth − twin| + tol·magnitude, -inf in the same places.

    ``magnitude`` bounds what fp32 rounding scales with: the row's largest
    logit (a ±1e4 entry carries into every log-prob of its row) and the
    summed |terms| of the low-rank product (a sum over V entries).
    """
    assert torch.equal(torch.isneginf(ours), torch.isneginf(truth))
    finite = torch.isfinite(truth)
    err_ours = (truth - ours.double()).abs()[finite]
    err_twin = (truth - twin.double()).abs()[finite]
    slack = tol * magnitude.expand_as(truth)[finite]
    assert bool((err_ours <= err_twin + slack).all()), float((err_ours - err_twin).max())


def read_rows(z0, p, masked):
    """The rows as the low-rank part reads them: masked entries 0 and, for a
    centred map, each row less the mean of its unmasked entries."""
    if not p.get("centered"):
        return z0
    kept = (~masked).to(z0.dtype)
    mean = z0.sum(1, keepdim=True) / kept.sum(1, keepdim=True).clamp_min(1)
    return (z0 - mean) * kept


def affine64(z0, p, masked):
    """``T(z)`` in float64 from the definitions (masked entries already 0)."""
    if p.get("weight") is not None:
        t = z0 @ p["weight"].t()
    else:
        t = z0 * p["scale"] if p.get("scale") is not None else z0
        t = t + (read_rows(z0, p, masked) @ p["a"]) @ p["b"].t()
    return t + p["bias"] if p.get("bias") is not None else t


def float64_params(p):
    """Kernel params in float64, flags (``centered``) as they are."""
    return {k: (x.double() if isinstance(x, torch.Tensor) else x) for k, x in p.items()}


def float64_truth(z, p, tau, output):
    """The transform and softmax in float64 from the definitions, and the
    per-row magnitude fp32 rounding scales with (see :func:`close_to_truth`)."""
    z = z.double()
    masked = torch.isneginf(z)
    z0 = z.masked_fill(masked, 0.0)
    p = float64_params(p)
    if p.get("weight") is not None:
        terms = z0.abs() @ p["weight"].abs().t()
    else:
        terms = (z0.abs() @ p["a"].abs()) @ p["b"].abs().t()
    t = affine64(z0, p, masked).masked_fill(masked, float("-inf")) / tau
    magnitude = (z0.abs().amax(1, keepdim=True) + terms.amax(1, keepdim=True)).clamp_min(1.0)
    return (t.log_softmax(-1) if output == "logprobs" else t), magnitude


SHAPES = [(1, 1), (3, 7), (17, 1000), (3, 49152)]


@pytest.mark.parametrize(
    ("family", "n", "v"),
    # dense holds V² parameters: it is for small or top-k-restricted vocabularies
    [(f, n, v) for f in MAKERS for n, v in SHAPES if not (f == "dense" and v > 1000)],
)
@pytest.mark.parametrize("output", ["logits", "logprobs"])
def test_purify_kernel_matches_twin(family, n, v, output, path):
    transform = trained_like(MAKERS[family](v), scale=0.01)
    p = params_of(transform)
    z = awkward_logits(n, v)
    ours = purify_triton(z, p, 1.7, output)
    twin = purify_reference(z, p, 1.7, output)
    close_to_truth(ours, twin, *float64_truth(z, p, 1.7, output), 1e-6)


def test_purify_kernel_large_vocab_and_top_k(path):
    v = 151_936
    transform = trained_like(LowRankTransform(v, 16), scale=1e-3)
    p = params_of(transform)
    z = awkward_logits(1, v, seed=3)
    ours_v, ours_i = purify_triton(z, p, 1.0, "logprobs", top_k=20)
    twin_v, twin_i = purify_reference(z, p, 1.0, "logprobs", top_k=20)
    torch.testing.assert_close(ours_v, twin_v, rtol=1e-5, atol=1e-4)
    assert torch.equal(ours_i, twin_i)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_purify_kernel_half_inputs(dtype, force, path):
    transform = trained_like(DiagLowRankTransform(1000, 8), scale=0.01).to(DEVICE)
    z = awkward_logits(17, 1000).to(dtype)
    force("triton")
    ours = purify(z, transform, output="logprobs")
    force("torch")
    twin = purify(z, transform, output="logprobs")
    assert ours.dtype == dtype
    torch.testing.assert_close(ours.float(), twin.float(), rtol=1e-2, atol=1e-2)


def test_offsets_past_2_to_the_31():
    """Rows of a strided view whose element offsets pass 2³¹ (no 8 GB is touched)."""
    v, stride = 1000, 2**30 + 7
    base = torch.empty(2 * stride + v, dtype=torch.float16, device=DEVICE)
    z = base.as_strided((3, v), (stride, 1))
    z.copy_(random_logits(3, v).half())
    assert z.storage_offset() + 2 * stride > 2**31
    p = params_of(trained_like(LowRankTransform(v, 4), scale=0.01))
    ours = purify_triton(z, p, 1.0, "logprobs")
    twin = purify_reference(z.contiguous(), p, 1.0, "logprobs")
    # fp16 outputs: the two may round to neighbouring halves (one ulp is 2⁻¹⁰ relative)
    torch.testing.assert_close(ours.float(), twin.float(), rtol=2**-10, atol=2e-3)


def objective_and_grads(z, labels, transform, estimator, lams, tau, scale=1.0):
    z = z.clone().requires_grad_(True)
    loss, stats = anti_distillation_loss(
        z, labels, transform, *lams, temperature=tau, estimator=estimator, return_stats=True
    )
    grads = torch.autograd.grad(scale * loss, [*transform.parameters(), z])
    return loss.detach(), stats, grads


@pytest.mark.parametrize("family", list(MAKERS))
@pytest.mark.parametrize("estimator", ["exact", "streaming"])
@pytest.mark.parametrize(
    ("lams", "tau", "scale"), [((1.0, 1.0, 0.0), 1.0, 1.0), ((1.3, 0.7, 0.5), 1.7, -2.5)]
)
def test_objective_kernels_match_twin(family, estimator, lams, tau, scale, force):
    v = 7 if family == "dense" else 1000
    transform = trained_like(MAKERS[family](v), scale=0.02).to(DEVICE)
    z = awkward_logits(17, v, seed=2)
    labels = torch.tensor([0, 1, 1, 2, 2, 2, -100, 3, 3, 4, 5, 5, 6, 1, 2, 4, 0], device=DEVICE) % v
    labels[6] = -100
    labels[0] = int(z[0].argmax())  # the only unmasked token of row 0
    force("triton")
    ours = objective_and_grads(z, labels, transform, estimator, lams, tau, scale)
    force("torch")
    twin = objective_and_grads(z, labels, transform, estimator, lams, tau, scale)
    truth = float64_objective_grads(z, labels, transform, estimator, lams, tau, scale)
    assert ours[0].item() == pytest.approx(twin[0].item(), rel=1e-5, abs=1e-5)
    assert ours[0].item() == pytest.approx(truth[0], rel=1e-5, abs=1e-5)
    assert ours[1] == pytest.approx(twin[1], rel=1e-4, abs=1e-5)
    # the ±1e4 logits make fp32 gradients ill-conditioned where they multiply in:
    # ours may be no further from float64 than the fp32 twin is, plus a small slack
    for mine, other, exact in zip(ours[2], twin[2], truth[1], strict=True):
        err_ours = (mine.double() - exact).abs()
        err_twin = (other.double() - exact).abs()
        slack = 1e-5 * max(1.0, exact.abs().max().item())
        assert bool((err_ours <= err_twin + slack).all()), float((err_ours - err_twin).max())


def float64_objective_grads(z, labels, transform, estimator, lams, tau, scale):
    """Loss and gradients by plain float64 autograd from the definitions. The
    streaming centroids are the fp32 ones both paths compute: a constant."""
    lam_cmi, lam_ce, lam_kl = lams
    t64 = copy.deepcopy(transform).double()
    z64 = z.detach().double().requires_grad_(True)
    masked = torch.isneginf(z64)
    # (bf16 factors: rounded as the kernels read them, then float64)
    t = affine64(z64.masked_fill(masked, 0.0), float64_params(t64.kernel_params()), masked)
    t = t.masked_fill(masked, float("-inf"))
    logp = torch.log_softmax(t / tau, -1)
    p = logp.exp()
    logp = logp.masked_fill(masked, 0.0)
    rows, group, _, counts = label_groups(labels, 2)
    if estimator == "exact":
        sums = torch.zeros(counts.numel(), z.shape[1], dtype=torch.float64, device=z.device)
        mean = sums.index_add(0, group, p[rows]) / counts[:, None]
        log_q = mean.clamp_min(torch.finfo(torch.float32).tiny).log()
    else:
        with torch.no_grad():
            t32 = affine_logits(z, **transform.kernel_params())
        state = StreamingCentroids(z.shape[1])
        log_q = state.log_centroids(t32, labels, tau, 2).double()
    cmi_value = (p[rows] * (logp[rows] - log_q[group])).sum() / rows.numel()
    valid = labels != -100
    log_s = torch.log_softmax(t, -1)[valid]
    ce = -log_s.gather(1, labels[valid, None]).sum() / valid.sum()
    q = torch.softmax(z64.detach()[valid], -1)
    log_qz = torch.log_softmax(z64.detach()[valid], -1).masked_fill(q == 0, 0.0)
    kl = (q * (log_qz - log_s.masked_fill(q == 0, 0.0))).sum() / valid.sum()
    loss = lam_cmi * cmi_value + lam_ce * ce + lam_kl * kl
    return loss.item(), torch.autograd.grad(scale * loss, [*t64.parameters(), z64])


@pytest.mark.parametrize(("n", "v"), [(1, 7), (3, 1), (17, 1000), (3, 49152)])
def test_cmi_kernel_matches_twin(n, v, force):
    z = awkward_logits(n, v, seed=5)
    labels = (torch.arange(n, device=DEVICE) // 2) % v
    force("triton")
    ours = cmi(z, labels, temperature=1.5)
    force("torch")
    assert ours.item() == pytest.approx(cmi(z, labels, temperature=1.5).item(), rel=1e-5, abs=1e-6)


def test_backend_selection(monkeypatch):
    cpu = torch.zeros(1)
    monkeypatch.delenv("CMIGUARD_BACKEND", raising=False)
    assert backend(cpu) == "torch"
    assert backend(torch.zeros(TWIN_MAX_LOGITS + 1, device="meta")) == "torch"
    assert auto_backend("cuda", TWIN_MAX_LOGITS + 1) == "triton"
    assert auto_backend("cuda", TWIN_MAX_LOGITS) == "torch"  # a decode batch
    assert auto_backend("cpu", 1 << 40) == "torch"
    monkeypatch.setenv("CMIGUARD_BACKEND", "cuda")
    with pytest.raises(ValueError, match="CMIGUARD_BACKEND must be one of"):
        backend(cpu)
    monkeypatch.setenv("CMIGUARD_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        backend(cpu)


def test_a_broken_interpreter_stops_the_run_with_its_reason(monkeypatch):
    """Triton 3.6's interpreter with NumPy >= 2.4 (the GPU image's pair) fails
    every loop; the run stops at once and says so, instead of 100 failures."""
    import numpy
    import triton

    from tests import conftest

    assert conftest.interpreter_fault("3.7.0", "2.5.2") is None
    assert conftest.interpreter_fault("3.6.0", "2.3.5") is None
    fault = conftest.interpreter_fault("3.6.0", "2.4.0")
    assert "triton 3.6.0" in fault and "numpy 2.4.0" in fault and "#9171" in fault
    monkeypatch.setattr(triton, "__version__", "3.6.0")
    monkeypatch.setattr(numpy, "__version__", "2.5.2")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(pytest.UsageError, match="numpy 2.5.2"):
        conftest.pytest_configure(None)
    monkeypatch.setenv("TRITON_INTERPRET", "0")  # compiled kernels: no interpreter to check
    conftest.pytest_configure(None)


@pytest.mark.parametrize("v", [1, 7, 1000, 49_152, 151_936])
def test_vocab_split_covers_the_vocabulary_once(v):
    cfg = launch_config(3, v, 5)
    splits, chunk = vocab_split(3, v, cfg, DEVICE)
    assert chunk % cfg.block_v == 0
    assert (splits - 1) * chunk < v <= splits * chunk  # no empty chunk, none missing
    with forced(LaunchConfig(16, 64, 16)):
        assert launch_config(3, v, 5) == LaunchConfig(16, 64, 16)
        assert vocab_split(3, v, launch_config(3, v, 5), DEVICE)[1] % 64 == 0
    assert launch_config(3, v, 5) == cfg


def test_the_splits_a_gpu_takes_cover_everything_once(monkeypatch):
    """The GPU branch of the vocabulary and row splits (sized from the SM
    count, which the interpreter never reaches), on an H100's 132 SMs: every
    column and row in exactly one non-empty chunk, chunks whole tiles."""
    from types import SimpleNamespace

    from cmiguard.kernels import config, objective_backward

    for module in (config, objective_backward):
        monkeypatch.setattr(module, "interpreting", lambda: False)
    h100 = SimpleNamespace(multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    for n in (1, 3, 16, 17, 64, 257, 1024, 8192, 65_536):
        for v in (1, 7, 129, 1000, 49_152, 151_936, 262_144):
            cfg = launch_config(n, v, 64)
            splits, chunk = vocab_split(n, v, cfg, "cuda")
            assert chunk % cfg.block_v == 0 and (splits - 1) * chunk < v <= splits * chunk
            blocks, rows = objective_backward.row_split(n, v, cfg, "cuda")
            assert rows % cfg.block_n == 0 and (blocks - 1) * rows < n <= blocks * rows
    assert vocab_split(1, 151_936, launch_config(1, 151_936, 64), "cuda")[0] > 132  # fills it


@pytest.mark.parametrize("output", ["logits", "logprobs"])
def test_the_purify_kernels_check_the_input_as_they_write(force, output, path):
    """No validation pass on the kernel path: the write pass (decode: the
    project pass) counts NaN, +inf and finite entries and purify raises the
    twin's messages."""
    transform = trained_like(LowRankTransform(300, 4), scale=0.01).to(DEVICE)
    force("triton")
    for poison, message in [
        (float("nan"), "contain NaN"),
        (float("inf"), r"contain \+inf"),
        (None, "entirely -inf"),
    ]:
        z = awkward_logits(5, 300)
        if poison is None:
            z[3] = float("-inf")
        else:
            z[2, 123] = poison
        with pytest.raises(ValueError, match=message):
            purify(z, transform, output=output)
        with pytest.raises(ValueError, match=message):
            purify(z, transform, output=output, top_k=3)
    clean = purify(awkward_logits(5, 300), transform, output=output)
    force("torch")
    twin = purify(awkward_logits(5, 300), transform, output=output)
    torch.testing.assert_close(clean, twin, rtol=1e-5, atol=2e-4)  # a row holds ±1e4


@pytest.mark.parametrize(
    "family", ["lowrank", "lowrank_centered", "lowrank_centered_bf16", "diag_lowrank"]
)
@pytest.mark.parametrize("estimator", ["exact", "streaming"])
@pytest.mark.parametrize(("lams", "tau"), [((1.0, 1.0, 0.0), 1.0), ((0.7, 0.3, 0.5), 1.6)])
def test_the_two_pass_backward_matches_float64(family, estimator, lams, tau, force):
    """Logits that need no gradient (a frozen teacher's) take the fused backward:
    no [N, V] gradient, no GEMM; its parameter gradients are no further from
    float64 than the twin's, and two runs give the same bits."""
    v = 1000
    transform = trained_like(MAKERS[family](v), scale=0.02).to(DEVICE)
    z = awkward_logits(17, v, seed=2)
    labels = torch.tensor([0, 1, 1, 2, 2, 2, -100, 3, 3, 4, 5, 5, 6, 1, 2, 4, 0], device=DEVICE)
    labels[0] = int(z[0].argmax())

    def grads(name):
        force(name)
        loss = anti_distillation_loss(
            z, labels, transform, *lams, temperature=tau, estimator=estimator
        )
        return loss.detach(), torch.autograd.grad(2.5 * loss, list(transform.parameters()))

    ours, again, twin = grads("triton"), grads("triton"), grads("torch")
    truth = float64_objective_grads(z, labels, transform, estimator, lams, tau, 2.5)
    assert ours[0].item() == pytest.approx(truth[0], rel=1e-5, abs=1e-5)
    # truth's last gradient is the logits', which the fused path does not compute;
    # bf16 factors take a bf16 gradient, which one ulp of rounding may flip
    ulp = 2.0**-7 if family.endswith("bf16") else 0.0
    for mine, other, exact in zip(ours[1], twin[1], truth[1][:-1], strict=True):
        err_ours = (mine.double() - exact).abs()
        err_twin = (other.double() - exact).abs()
        slack = 1e-5 * max(1.0, exact.abs().max().item()) + ulp * exact.abs()
        assert bool((err_ours <= err_twin + slack).all()), float((err_ours - err_twin).max())
    for first, second in zip(ours[1], again[1], strict=True):
        assert torch.equal(first, second)  # fixed-order reductions: deterministic


def test_the_fused_path_is_the_one_taken(monkeypatch, force):
    """The low-rank objective on gradient-free logits goes through the two-pass
    backward, bf16 factors included; logits that need a gradient do not."""
    from cmiguard.kernels import objective_backward

    calls = []
    real = objective_backward.FusedLowRankObjective.apply
    monkeypatch.setattr(
        objective_backward.FusedLowRankObjective,
        "apply",
        lambda *a: calls.append(1) or real(*a),
    )
    force("triton")
    transform = LowRankTransform(300, 4, factor_dtype="bfloat16")
    transform = trained_like(transform, scale=0.02).to(DEVICE)
    z = awkward_logits(9, 300)
    labels = torch.tensor([int(z[0].argmax()), 1, 1, 2, 2, 3, 3, 4, 4], device=DEVICE)
    anti_distillation_loss(z, labels, transform).backward()
    assert calls == [1] and transform.a.grad.dtype == torch.float32
    anti_distillation_loss(z.clone().requires_grad_(True), labels, transform)
    assert calls == [1]


def test_the_fused_step_checks_the_input_as_it_projects(force):
    transform = trained_like(LowRankTransform(300, 4), scale=0.02).to(DEVICE)
    labels = torch.arange(6, device=DEVICE) % 3
    force("triton")
    for poison, message in [(float("nan"), "contain NaN"), (float("inf"), r"contain \+inf")]:
        z = awkward_logits(6, 300)
        labels[0] = int(z[0].argmax())
        z[4, 17] = poison
        with pytest.raises(ValueError, match=message):
            anti_distillation_loss(z, labels, transform)


def test_project_sums_its_split_k_parts_and_finds_the_first_argmax():
    """u = zA from one launch (the last program per block sums the parts), the
    raw argmax on the same read with torch's tie rule, and the tickets left at
    zero for the next launch; centred, u less the mean term and the rows'
    unmasked means, from the same launch."""
    from cmiguard.kernels import purify as purify_module

    v = 1000
    z = awkward_logits(19, v, seed=4)
    z[1, 10] = z[1, 990] = z[1].max() + 1.0  # a tie across the first and last chunk
    z[2, :500] = float("-inf")  # the first chunk all masked: the argmax is in a later one
    a = torch.randn(v, 7, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    z[3, 1:] = float("-inf")  # one unmasked entry: its row reads as all zeros centred
    z[4] = float("-inf")  # none: its mean is 0
    u, j, mean = purify_module.project(z, a, argmax=True)
    masked = torch.isneginf(z)
    z0 = z.double().masked_fill(masked, 0.0)
    torch.testing.assert_close(u.double(), z0 @ a.double(), rtol=1e-5, atol=1e-3)
    assert mean is None
    assert torch.equal(j, z.argmax(-1)) and int(j[1]) == 10
    assert all(int(t.count_nonzero()) == 0 for t in purify_module._TICKETS.values())
    again = purify_module.project(z, a, argmax=True).u
    assert torch.equal(again, u)  # a fixed order of summation: bit for bit
    centred = purify_module.project(z, a, centered=True)
    p64 = {"centered": True, "a": a.double()}
    torch.testing.assert_close(
        centred.u.double(), read_rows(z0, p64, masked) @ a.double(), rtol=1e-5, atol=1e-3
    )
    kept = (~masked).sum(1).clamp_min(1)
    torch.testing.assert_close(centred.mean.double(), z0.sum(1) / kept, rtol=1e-5, atol=1e-5)
    assert float(centred.u[3].abs().max()) <= 1e-3 * float(z[3, 0].abs()) and centred.mean[4] == 0
    assert torch.equal(purify_module.project(z, a, centered=True).u, centred.u)


def test_a_launch_that_raised_leaves_its_tickets_behind(monkeypatch):
    """Counters a failed launch may have left half-counted are never reused."""
    from cmiguard.kernels import purify as purify_module

    z, a = awkward_logits(3, 300), torch.randn(300, 4).to(DEVICE)
    want = purify_module.project(z, a).u
    (key,) = [k for k in purify_module._TICKETS if k[0] == z.device]
    dirty = purify_module._TICKETS[key]

    class Failing:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                args[11][0] = 1  # one program counted, then the launch fails
                raise RuntimeError("launch failed")

            return launch

    with monkeypatch.context() as m:
        m.setattr(purify_module, "project_kernel", Failing())
        with pytest.raises(RuntimeError, match="launch failed"):
            purify_module.project(z, a)
    assert key not in purify_module._TICKETS and int(dirty[0]) == 1
    torch.testing.assert_close(purify_module.project(z, a).u, want, rtol=0, atol=0)


def test_the_streaming_estimator_reads_operands_not_a_built_t(force, monkeypatch):
    """On the kernel path the streaming centroids come from a scatter pass over
    kernel operands (no [N, V] T(z) in torch), equal the twin's, and a batch
    with bad logits raises before the moving average moves."""
    labels = torch.tensor([0, 2, 1, 2, 5, 5, 7, -100, 1])  # row 0 is masked to token 0
    transform = trained_like(LowRankTransform(300, 4), scale=0.05).to(DEVICE)
    states = {}
    for name in ("torch", "triton"):
        force(name)
        states[name] = StreamingCentroids(300)
        for step in range(2):  # the second batch reads the first one's average
            anti_distillation_loss(
                awkward_logits(9, 300, seed=step),
                labels.to(DEVICE),
                transform,
                estimator="streaming",
                state=states[name],
            )
        if name == "torch":

            def built(self, rows):
                raise AssertionError("T(z) built in torch on the kernel path")

            monkeypatch.setattr(LowRankTransform, "apply_fp32", built)
    assert states["triton"].centroids.keys() == states["torch"].centroids.keys()
    for label, centroid in states["torch"].centroids.items():
        torch.testing.assert_close(states["triton"].centroids[label], centroid)
    before = {k: c.clone() for k, c in states["triton"].centroids.items()}
    bad = awkward_logits(9, 300, seed=2)
    bad[2, 5] = float("nan")
    with pytest.raises(ValueError, match="contain NaN"):
        anti_distillation_loss(
            bad, labels.to(DEVICE), transform, estimator="streaming",
            state=states["triton"],
        )  # fmt: skip
    for label, centroid in before.items():
        assert torch.equal(states["triton"].centroids[label], centroid)


def test_row_lse_gives_zero_for_what_is_not_asked():
    """Unrequested log-sum-exps are 0, never the values of an uninitialised buffer."""
    from cmiguard.kernels.purify import row_lse

    z = awkward_logits(5, 300)
    for _ in range(3):  # fresh buffers each call: garbage would show on some call
        lse = row_lse({"x": z}, z, 2.0, launch_config(5, 300, 0))
        assert torch.equal(lse[:, 1:], torch.zeros(5, 2, device=DEVICE))
        torch.testing.assert_close(lse[:, 0], (z.double() / 2).logsumexp(-1).float())
