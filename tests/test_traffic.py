"""The traffic model of bench/problems.py against what the ops really launch
(counted under the interpreter): passes over [N, V] and kernel launches."""

import pytest
import torch

from bench.problems import KERNEL_PASSES, TRAFFIC, Traffic
from cmiguard import LowRankTransform, anti_distillation_loss, purify
from cmiguard.kernels import cmi_loss, decode, objective_backward
from cmiguard.kernels import purify as purify_module
from tests.conftest import trained_like
from tests.test_kernels import DEVICE, awkward_logits

MODULES = (purify_module, decode, cmi_loss, objective_backward)


class Counted:
    """A kernel whose launches are recorded by name."""

    def __init__(self, kernel, name, seen):
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        self.seen.append(self.name)
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    seen: list[str] = []
    for module in MODULES:
        for name in KERNEL_PASSES:
            if hasattr(module, name):
                monkeypatch.setattr(module, name, Counted(getattr(module, name), name, seen))
    monkeypatch.setenv("CMIGUARD_BACKEND", "triton")
    return seen


def measured(seen: list[str], torch_launches: int) -> Traffic:
    reads = sum(KERNEL_PASSES[name][0] for name in seen)
    writes = sum(KERNEL_PASSES[name][1] for name in seen)
    return Traffic(reads, writes, len(seen) + torch_launches)


@pytest.mark.parametrize("centered", [False, True])  # the mean term rides on the project pass
@pytest.mark.parametrize("guard", [None, 0.5])
@pytest.mark.parametrize("output", ["logprobs", "logits"])
def test_purify_launches_what_the_model_says(launches, monkeypatch, output, guard, centered):
    monkeypatch.setattr(purify_module, "DECODE_MAX_ROWS", 0)  # the general path
    t = LowRankTransform(1000, 8, guard_margin=guard, centered=centered)
    t = trained_like(t, scale=0.01).to(DEVICE)
    purify(awkward_logits(5, 1000), t, output=output)
    model = TRAFFIC[f"purify_{output}"]
    if guard is not None and output == "logits":
        model = TRAFFIC["purify_logprobs"]  # the guard's statistics need the lse pass
    assert measured(launches, 0) == model
    assert launches[0] == "project_kernel"  # no validation pass before it


@pytest.mark.parametrize("guard", [None, 0.5])
def test_decode_launches_what_the_model_says(launches, guard):
    t = trained_like(LowRankTransform(1000, 8, guard_margin=guard), scale=0.01).to(DEVICE)
    purify(awkward_logits(5, 1000), t, output="logprobs")
    assert measured(launches, 0) == TRAFFIC["purify_decode_logprobs"]
    assert launches == ["project_kernel", "decode_write_kernel", "fixup_kernel"]


@pytest.mark.parametrize("centered", [False, True])
def test_a_training_step_launches_what_the_model_says(launches, centered):
    t = trained_like(LowRankTransform(1000, 8, centered=centered), scale=0.01).to(DEVICE)
    z = awkward_logits(9, 1000)
    labels = torch.tensor([int(z[0].argmax()), 1, 1, 2, 2, 3, 3, 4, 4], device=DEVICE)
    anti_distillation_loss(z, labels, t).backward()
    assert measured(launches, 0) == TRAFFIC["train_exact"]
    assert TRAFFIC["train_exact"].passes <= 6 and "grad_kernel" not in launches
