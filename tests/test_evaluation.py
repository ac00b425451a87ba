import json

import pytest
import torch

from cmiguard import LowRankTransform
from cmiguard.evaluation import DEFENSES, EvalConfig, defense_fn, evaluate
from cmiguard.models import tiny_model
from cmiguard.report import gap_closed, write_evaluation
from tests.test_trainer import tiny_examples


def run(transform):
    config = EvalConfig(
        attacks=("forward_kl", "top5", "adaptive_retemper"),
        student_layers=1,
        steps=3,
        batch_size=3,
        progress=False,
    )
    teacher = tiny_model(96, seed=0)
    return evaluate(teacher, transform, tiny_examples(8), tiny_examples(3, seed=9), 0, config)


def test_evaluation_covers_every_attack_and_defense_reproducibly(tmp_path):
    transform = LowRankTransform(96, 4, temperature=2.0)
    first, second = run(transform), run(transform)
    assert first == second
    assert set(first["attacks"]) == {"forward_kl", "top5", "adaptive_retemper"}
    for row in first["attacks"].values():
        assert set(row) == set(DEFENSES)
        assert all(0.0 <= v <= 1.0 for v in row.values())
    assert first["teacher_accuracy_purified"] == first["teacher_accuracy_raw"]  # τ keeps the argmax
    assert first["cmi"]["cmiguard"] < first["cmi"]["no_defense"]
    write_evaluation(first, tmp_path)
    assert json.loads((tmp_path / "evaluation.json").read_text())["attacks"] == first["attacks"]
    assert (tmp_path / "evaluation.png").stat().st_size > 1000
    assert "gap closed" in (tmp_path / "evaluation.md").read_text()


def test_defenses_hand_out_log_probabilities():
    z = torch.randn(5, 40) * 3
    for name in DEFENSES:
        lp = defense_fn(name, LowRankTransform(40, 2, temperature=3.0), EvalConfig())(z)
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(5))
    top1 = defense_fn("top1_only", LowRankTransform(40, 2), EvalConfig())(z)
    assert torch.equal(top1.argmax(-1), z.argmax(-1)) and torch.isfinite(top1).sum() == 5
    with pytest.raises(ValueError, match="unknown defense"):
        defense_fn("encryption", LowRankTransform(40, 2), EvalConfig())


def test_gap_closed():
    assert gap_closed(0.5, 0.4, 0.3) == pytest.approx(0.5)
    assert gap_closed(0.5, 0.3, 0.3) == pytest.approx(1.0)
