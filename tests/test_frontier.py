"""The frontier: gaps against both floors, the strongest attack, the verdict, resume."""

import json
import math

import pytest

from cmiguard import LowRankTransform
from cmiguard.attack.evaluation import EvalConfig
from cmiguard.attack.frontier import (
    FRONTIER_ATTACKS,
    _cmiguard_runs,
    frontier,
    report_frontier,
    run_frontier,
    verdicts,
)
from cmiguard.train.models import tiny_model
from tests.test_evaluation import tiny_questions
from tests.test_trainer import tiny_examples


def result(seed, cells, floor=0.10, top1=0.15, likelihood=None, perplexity=None):
    """An evaluation's results: ``cells[defense]`` is each attack's student
    accuracy, ``perplexity[defense]`` (default 50 everywhere) its perplexity."""
    attacks = {a: {d: accs[i] for d, accs in cells.items()} for i, a in enumerate(FRONTIER_ATTACKS)}
    perplexity = perplexity or {d: [50.0] * len(FRONTIER_ATTACKS) for d in cells}
    return {
        "config": {"seed": seed, "steps": 240},
        "hard_label_floor": floor,
        "top1_student": top1,
        "floor_perplexity": {"sft": 90.0, "top1": 80.0},
        "attacks": attacks,
        "perplexity": {
            a: {d: ppl[i] for d, ppl in perplexity.items()} for i, a in enumerate(FRONTIER_ATTACKS)
        },
        "likelihood_accuracy": likelihood or dict.fromkeys(cells, 0.5),
        "teacher_accuracy": dict.fromkeys(cells, 0.4),
        "cmi": dict.fromkeys(cells, 1.0),
        "cmi_retempered": dict.fromkeys(cells, 1.0),
    }


def test_gaps_against_both_floors_and_the_strongest_attack():
    # raw students 0.30 under every attack; floors 0.10 (SFT) and 0.20 (top-1)
    raw = [0.30] * 5
    runs = [
        result(s, {"no_defense": raw, "soften@2": [0.20, 0.25, 0.30, 0.28, 0.29]}, top1=0.20)
        for s in (0, 1)
    ]
    front = frontier(runs)
    assert front["seeds"] == ["0", "1"]
    soft = next(p for p in front["points"] if p["defense"] == "soften@2")
    assert (soft["family"], soft["knob"]) == ("soften", 2.0)
    # forward KL: (0.30 - 0.20) / (0.30 - 0.10) = 0.5 vs SFT, 0.1 / 0.1 = 1.0 vs top-1
    assert soft["mean_gap_closed"]["sft"]["forward_kl"] == pytest.approx(0.5)
    assert soft["mean_gap_closed"]["top1"]["forward_kl"] == pytest.approx(1.0)
    # the re-temperer gets the raw student back: it is the strongest, y = 0
    assert (
        soft["strongest_attack"]["sft"] == soft["strongest_attack"]["top1"] == "adaptive_retemper"
    )
    assert (soft["y"]["sft"], soft["y"]["top1"]) == (pytest.approx(0.0), pytest.approx(0.0))
    assert soft["students"]["reverse_kl"]["1"] == {"accuracy": 0.25, "perplexity": 50.0}
    assert front["floors"]["0"] == {
        "sft": 0.1,
        "top1": 0.2,
        "sft_perplexity": 90.0,
        "top1_perplexity": 80.0,
    }
    with pytest.raises(ValueError, match="only seeds differ"):
        frontier([runs[0], {**runs[1], "config": {"seed": 1, "steps": 60}}])


def test_gaps_on_the_students_log_likelihood():
    # raw students' perplexity 40, SFT floor 90, top-1 student 80 (result's floors)
    cells = {"no_defense": [0.3] * 5, "top_k@5": [0.3] * 5}
    ppl = {"no_defense": [40.0] * 5, "top_k@5": [60.0, 50.0, 45.0, 70.0, 55.0]}
    runs = [result(s, cells, perplexity=ppl) for s in (0, 1)]
    point = next(p for p in frontier(runs)["points"] if p["defense"] == "top_k@5")
    # (log 45 - log 40) / (log 90 - log 40): the re-temperer stops it least
    want = (math.log(45) - math.log(40)) / (math.log(90) - math.log(40))
    assert point["strongest_attack"]["sft_nll"] == "adaptive_retemper"
    assert point["y"]["sft_nll"] == pytest.approx(want)
    assert point["y_sd"]["sft_nll"] == pytest.approx(0.0)
    want = (math.log(45) - math.log(40)) / (math.log(80) - math.log(40))
    assert point["y"]["top1_nll"] == pytest.approx(want)
    # the same accuracy as the raw teacher's students: nothing closed on accuracy
    assert point["y"]["sft"] == pytest.approx(0.0)
    assert point["gap_closed"]["sft_nll"]["reverse_kl"]["1"] == pytest.approx(
        (math.log(50) - math.log(40)) / (math.log(90) - math.log(40))
    )


def test_the_attackers_best_student_against_its_best_from_raw_logits():
    # a weak attack on raw logits (reverse KL, perplexity 80) that the defense helps
    cells = {"no_defense": [0.3] * 5, "soften@2": [0.3] * 5}
    ppl = {"no_defense": [40.0, 80.0, 40.0, 40.0, 45.0], "soften@2": [60.0, 70.0, 60.0, 62.0, 65.0]}
    seed1 = {
        "no_defense": [40.0, 80.0, 40.0, 40.0, 45.0],
        "soften@2": [60.0, 70.0, 55.0, 62.0, 65.0],
    }
    runs = [result(0, cells, perplexity=ppl), result(1, cells, perplexity=seed1)]
    point = next(p for p in frontier(runs)["points"] if p["defense"] == "soften@2")
    # per attack, reverse KL's student got better than its raw one: y < 0
    assert point["strongest_attack"]["sft_nll"] == "reverse_kl"
    assert point["y"]["sft_nll"] == pytest.approx(math.log(70 / 80) / math.log(90 / 80))
    # the best student (perplexity 60, then 55) against the best raw one (40)
    want = [math.log(60 / 40) / math.log(90 / 40), math.log(55 / 40) / math.log(90 / 40)]
    assert point["best_attack"]["sft_nll"] == {"0": "forward_kl", "1": "adaptive_retemper"}
    assert point["best_gap"]["sft_nll"] == {
        "0": pytest.approx(want[0]),
        "1": pytest.approx(want[1]),
    }
    assert point["y_best"]["sft_nll"] == pytest.approx(sum(want) / 2)
    assert point["y_best_sd"]["sft_nll"] == pytest.approx(abs(want[0] - want[1]) / math.sqrt(2))
    assert point["y_best"]["sft"] == pytest.approx(0.0)  # accuracy 0.3 on both sides


def test_seed_sd_is_the_median_spread_of_a_gap_over_seeds():
    cells = {"no_defense": [0.3] * 5, "top_k@5": [0.3] * 5}
    # accuracy gaps 0 on seed 0; on seed 1 the attacks' students fall by 0, .02, .04, .1, .06
    seed1 = {"no_defense": [0.3] * 5, "top_k@5": [0.3, 0.28, 0.26, 0.2, 0.24]}
    front = frontier([result(0, cells), result(1, seed1)])
    # gaps on seed 1: 0, 0.1, 0.2, 0.5, 0.3 (floor 0.10); sd of (0, g) = g / sqrt(2); median = 3rd
    assert front["seed_sd"]["sft"] == pytest.approx(0.2 / math.sqrt(2))
    assert front["seed_sd"]["sft_nll"] == pytest.approx(0.0)  # perplexity 50 everywhere
    assert math.isnan(frontier([result(0, cells)])["seed_sd"]["sft"])


def test_a_point_above_every_baseline_curve_and_one_below():
    likelihood = {
        "no_defense": 0.9,
        "soften@2": 0.7,
        "soften@10": 0.3,
        "top_k@1": 0.4,
        "cmiguard@good": 0.8,
        "cmiguard@bad": 0.5,
    }
    # y = gap closed under the strongest attack (here every attack gives the same student)
    y = {
        "soften@2": 0.2,
        "soften@10": 0.6,
        "top_k@1": 0.3,
        "cmiguard@good": 0.5,
        "cmiguard@bad": 0.1,
    }
    cells = {"no_defense": [0.3] * 5} | {d: [0.3 - 0.2 * g] * 5 for d, g in y.items()}
    front = frontier([result(0, cells, likelihood=likelihood)])
    checks = {(c["defense"], c["scale"]): c for c in verdicts(front)}
    good, bad = checks[("cmiguard@good", "sft")], checks[("cmiguard@bad", "sft")]
    # at x = 0.8 the temperature curve runs from (0.9, 0) to (0.7, 0.2): y = 0.1
    assert good["curves"]["soften"] == pytest.approx(0.1)
    assert good["curves"]["top_k"] == pytest.approx(0.06)  # (0.9, 0) to (0.4, 0.3)
    assert good["above_every_baseline"] and good["dominated_by"] == []
    assert not bad["above_every_baseline"] and bad["dominated_by"] == ["soften@2"]
    # every attack gives the same student here, so the best-student reading agrees
    best = {(c["defense"], c["scale"]): c for c in verdicts(front, "y_best")}
    assert best[("cmiguard@good", "sft")]["above_every_baseline"]
    assert best[("cmiguard@bad", "sft")]["dominated_by"] == ["soften@2"]


def tiny_config():
    return EvalConfig(
        student_layers=1,
        steps=2,
        batch_size=3,
        oracle_batches=1,
        compile_loss=False,
        progress=False,
    )


def test_run_frontier_resumes_and_adds_a_seed(tmp_path):
    teacher = tiny_model(96, seed=0)
    transforms = {"cmiguard@t": LowRankTransform(96, 4, guard_margin=0.5)}
    args = (teacher, transforms, tiny_examples(8), tiny_examples(3, seed=9), 0, tiny_config())
    defenses = ["soften@2", "top_k@5", "cmiguard@t"]

    def go(out, seeds):
        return run_frontier(*args, seeds, defenses, out, tiny_questions(), "frontier test")

    one = go(tmp_path / "a", [0])
    assert [p["defense"] for p in one["points"]] == ["no_defense", *defenses]
    on_disk = json.loads((tmp_path / "a" / "frontier.json").read_text())
    assert on_disk["command"] == "frontier test" and on_disk["seeds"] == ["0"]
    # both readings' verdicts, one per scale for the one cmiguard point
    assert [len(on_disk[k]) for k in ("verdicts", "verdicts_best")] == [4, 4]
    assert "best from the raw teacher" in (tmp_path / "a" / "frontier.md").read_text()
    first_seconds = json.loads((tmp_path / "a" / "seed0" / "evaluation.json").read_text())[
        "seconds"
    ]
    both = go(tmp_path / "a", [0, 1])  # seed 0 resumes (nothing to train), seed 1 is new
    seed0 = json.loads((tmp_path / "a" / "seed0" / "evaluation.json").read_text())
    assert seed0["seconds"] < first_seconds + 30  # no student was trained again
    fresh = go(tmp_path / "b", [0, 1])
    for p, q in zip(both["points"], fresh["points"], strict=True):
        assert p["students"] == q["students"]
        assert json.dumps(p["gap_closed"]) == json.dumps(q["gap_closed"])  # NaN where raw = floor
    assert both["seeds"] == ["0", "1"]
    for png in ("frontier.png", "frontier_best.png"):
        assert (tmp_path / "a" / png).stat().st_size > 10_000
    assert "cmiguard@t" in (tmp_path / "a" / "frontier.md").read_text()
    # --report: the same frontier from the files alone; a missing seed is skipped
    (tmp_path / "a" / "frontier.json").unlink()
    again = report_frontier(tmp_path / "a", [0, 1, 2], "frontier test")
    assert json.dumps(again["points"]) == json.dumps(both["points"])
    assert json.loads((tmp_path / "a" / "frontier.json").read_text())["seeds"] == ["0", "1"]
    # one seed's frontier kept apart from the two-seed one
    one = report_frontier(tmp_path / "a", [1], "frontier test", tmp_path / "a" / "seed1")
    assert one["seeds"] == ["1"]
    assert json.loads((tmp_path / "a" / "seed1" / "frontier.json").read_text())["seeds"] == ["1"]
    assert json.loads((tmp_path / "a" / "frontier.json").read_text())["seeds"] == ["0", "1"]


def test_the_plot_joins_a_runs_steps_and_never_two_runs():
    points = [{"knob": k} for k in ("lam1-step2", "cmi30", "lam1-step30", "cmi-step30")]
    runs = [[p["knob"] for p in run] for run in _cmiguard_runs(points)]
    assert runs == [["lam1-step2", "lam1-step30"], ["cmi30"], ["cmi-step30"]]


def test_a_point_needs_every_attack_asked_for(tmp_path):
    cells = {"no_defense": [0.3] * 5, "top_k@5": [0.3, 0.28, 0.26, 0.2, 0.24]}
    run = result(0, cells) | {"seconds": 60.0}
    newest = FRONTIER_ATTACKS[-1]
    del run["attacks"][newest]["top_k@5"], run["perplexity"][newest]["top_k@5"]
    (tmp_path / "seed0").mkdir()
    (tmp_path / "seed0" / "evaluation.json").write_text(json.dumps(run))
    # top_k@5 has not met the newest attack yet: no point until it has
    every = report_frontier(tmp_path, [0], "test")
    assert [p["defense"] for p in every["points"]] == ["no_defense"]
    earlier = FRONTIER_ATTACKS[:-1]
    some = report_frontier(tmp_path, [0], "test", tmp_path / "some", attacks=earlier)
    assert [p["defense"] for p in some["points"]] == ["no_defense", "top_k@5"]
    assert json.loads((tmp_path / "some" / "frontier.json").read_text())["attacks"] == list(earlier)
