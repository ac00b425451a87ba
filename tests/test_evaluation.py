import json
import math

import pytest
import torch

from cmiguard import LowRankTransform
from cmiguard.attack.defenses import DEFENSES, defense_fn, describe, parse
from cmiguard.attack.evaluation import EvalConfig, evaluate, likelihood_accuracy
from cmiguard.attack.report import (
    accuracy_noise,
    evaluation_table,
    gap_closed,
    seed_table,
    side_by_side,
    write_evaluation,
)
from cmiguard.train.data import ChoiceQuestion
from cmiguard.train.models import tiny_model
from tests.test_trainer import tiny_examples


def run_config() -> EvalConfig:
    return EvalConfig(
        attacks=(
            "forward_kl",
            "reverse_kl",
            "top5",
            "hard_label",
            "adaptive_retemper",
            "adaptive_retemper_reverse_kl",
            "adaptive_blind_inverse",
            "adaptive_blind_inverse_reverse_kl",
            "adaptive_bucket",
            "adaptive_linear",
        ),
        student_layers=1,
        steps=3,
        batch_size=3,
        oracle_batches=1,
        compile_loss=False,
        progress=False,
    )


def tiny_questions(n=6, seed=3):
    """Options of 1 to 4 tokens, so that a temperature can change which sum wins."""
    gen = torch.Generator().manual_seed(seed)

    def ids(k):
        return torch.randint(0, 96, (k,), generator=gen).tolist()

    return [ChoiceQuestion(ids(3), [ids(k) for k in (1, 2, 3, 4)], i % 4) for i in range(n)]


def run(transform, out=None, config=None, heldout_seed=9):
    teacher = tiny_model(96, seed=0)
    config = config or run_config()
    calibration, heldout = tiny_examples(8), tiny_examples(3, seed=heldout_seed)
    transforms = {"cmiguard": transform}
    return evaluate(teacher, transforms, calibration, heldout, 0, config, out, tiny_questions())


def test_evaluation_covers_every_attack_and_defense_reproducibly(tmp_path):
    transform = LowRankTransform(96, 4, temperature=2.0)
    first, second = run(transform), run(transform)
    first.pop("seconds"), second.pop("seconds")
    assert first == second
    assert list(first["attacks"]) == list(run_config().attacks)
    for row in first["attacks"].values():
        assert list(row) == list(DEFENSES)
        assert all(0.0 <= v <= 1.0 for v in row.values())  # finite: truncation is floored
    assert set(first["fitted_temperature"]["adaptive_retemper"]) == set(DEFENSES)
    # each adaptive view with reverse KL: the same fit, the reverse-KL loss (another student)
    taus, ppl = first["fitted_temperature"], first["perplexity"]
    for view in ("adaptive_retemper", "adaptive_blind_inverse"):
        assert taus[f"{view}_reverse_kl"] == taus[view]
        for other in (view, "reverse_kl"):
            assert ppl[f"{view}_reverse_kl"]["soften@2"] != ppl[other]["soften@2"]
    # the blind inverse's fitted scale is reported beside the re-temperer's τ
    assert set(first["fitted_temperature"]["adaptive_blind_inverse"]) == set(DEFENSES)
    assert list(first["likelihood_accuracy"]) == list(DEFENSES)
    assert first["defense_specs"]["top_k@5"] == "top_k@5"
    assert first["defense_specs"]["cmiguard"].startswith("cmiguard ")
    # τ keeps the argmax
    assert first["teacher_accuracy"]["cmiguard"] == first["teacher_accuracy_raw"]
    assert first["cmi"]["cmiguard"] < first["cmi"]["no_defense"]
    # the transform here is a pure temperature: re-tempering gives the raw CMI back
    assert first["cmi_retempered"]["cmiguard"] == pytest.approx(
        first["cmi_retempered"]["no_defense"], rel=0.02
    )
    assert first["cmi_retempered"]["cmiguard"] > 1.5 * first["cmi"]["cmiguard"]
    # the hard-label attacker on the raw teacher is the forward-KL attacker on top-1 outputs
    for key in ("attacks", "perplexity"):
        assert first[key]["hard_label"]["no_defense"] == first[key]["forward_kl"]["top_k@1"]
    assert (
        first["perplexity"]["hard_label"]["cmiguard"]
        != first["perplexity"]["forward_kl"]["cmiguard"]
    )
    write_evaluation(first, tmp_path)
    assert json.loads((tmp_path / "evaluation.json").read_text())["attacks"] == first["attacks"]
    assert (tmp_path / "evaluation.png").stat().st_size > 1000
    assert "Gap closed" in (tmp_path / "evaluation.md").read_text()


def test_likelihood_accuracy_is_the_summed_log_prob_argmax():
    model = tiny_model(96, seed=0)
    questions = []
    for q in tiny_questions(8):  # the gold option: the model's own 4-token greedy continuation
        seq = list(q.context)
        for _ in range(4):
            with torch.no_grad():
                seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
        questions.append(ChoiceQuestion(q.context, [*q.options[:3], seq[len(q.context) :]], 3))
    defenses = {  # the tiny model's logits are nearly flat (sd 0.18): sharpen one side
        "sharp": lambda z: torch.log_softmax(z * 50, -1),
        "flat": lambda z: torch.log_softmax(z, -1),
    }
    expected = {}
    for name, defend in defenses.items():
        hits = 0
        for q in questions:
            sums = []
            for option in q.options:  # one unpadded forward per option
                with torch.no_grad():
                    z = model(torch.tensor([q.context + option])).logits[0]
                served = defend(z[len(q.context) - 1 : -1])
                sums.append(float(served.gather(1, torch.tensor(option)[:, None]).sum()))
            hits += max(range(4), key=sums.__getitem__) == q.gold
        expected[name] = hits / len(questions)
    assert likelihood_accuracy(model, questions, defenses) == pytest.approx(expected, abs=1e-9)
    assert likelihood_accuracy(model, questions, defenses, chunk=3) == expected  # 3 + 3 + 2
    # a sharp teacher ranks its own continuation first; a flat one, the shortest option
    assert expected == {"sharp": 1.0, "flat": 0.0}


def test_defenses_hand_out_log_probabilities():
    z = torch.randn(5, 40) * 3
    transforms = {"cmiguard": LowRankTransform(40, 2, temperature=3.0)}
    for name in (*DEFENSES, "soften@10", "top_k@20", "noise@1"):
        lp = defense_fn(name, transforms)(z)
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(5))
    top1 = defense_fn("top_k@1", {})(z)
    assert torch.equal(top1.argmax(-1), z.argmax(-1)) and torch.isfinite(top1).sum() == 5
    # soften@τ is cmiguard without its learned map: equal while the map is the identity
    fresh = transforms["cmiguard"]
    soft = defense_fn("soften@3", {})(z)
    torch.testing.assert_close(soft, torch.log_softmax(z / 3.0, -1))
    torch.testing.assert_close(soft, defense_fn("cmiguard", transforms)(z))
    torch.testing.assert_close(defense_fn("sharpen@0.5", {})(z), torch.log_softmax(2 * z, -1))
    with torch.no_grad():
        fresh.b.normal_()
    assert not torch.allclose(soft, defense_fn("cmiguard", transforms)(z), atol=1e-2)
    noisy = defense_fn("noise@0.25", {}, seed=3)(z)
    assert torch.equal(noisy, defense_fn("noise@0.25", {}, seed=3)(z))
    assert float((noisy - torch.log_softmax(z, -1)).std()) == pytest.approx(0.25, rel=0.3)


def test_defense_names_are_checked():
    assert parse("top_k@20") == ("top_k", 20.0) and parse("cmiguard@step40") == (
        "cmiguard",
        "step40",
    )
    assert parse("sharpen@0.5") == ("sharpen", 0.5)
    for bad, match in [
        ("encryption", "unknown defense"),
        ("top1_only", "unknown defense"),
        ("soften@0.5", "must be > 1"),
        ("top_k@2.5", "an integer"),
        ("noise@big", "needs a finite number"),
        ("noise@inf", "needs a finite number"),  # NaN outputs
        ("soften@inf", "needs a finite number"),  # uniform outputs
        ("no_defense@1", "takes no knob"),
    ]:
        with pytest.raises(ValueError, match=match):
            parse(bad)
    with pytest.raises(ValueError, match="needs its transform"):
        defense_fn("cmiguard@late", {"cmiguard": LowRankTransform(40, 2)})
    one, other = LowRankTransform(40, 2), LowRankTransform(40, 2)
    assert describe("cmiguard", {"cmiguard": one}) != describe("cmiguard", {"cmiguard": other})
    assert describe("noise@0.50", {}) == "noise@0.5"


def test_gap_closed():
    assert gap_closed(0.5, 0.4, 0.3) == pytest.approx(0.5)
    assert gap_closed(0.5, 0.3, 0.3) == pytest.approx(1.0)


def test_accuracy_noise_is_two_standard_errors_of_a_difference():
    # binomial: var(acc) = p(1-p)/n for each of two students, so the SE of the
    # difference is sqrt(2 p (1-p) / n); at p = 0.5, n = 800 that is 0.025
    assert accuracy_noise(0.5, 800) == pytest.approx(0.05)
    assert accuracy_noise(0.15, 2000) == pytest.approx(2 * (2 * 0.15 * 0.85 / 2000) ** 0.5)


def test_leads_within_token_noise_are_marked(tmp_path):
    results = run(LowRankTransform(96, 4, temperature=2.0))
    assert results["heldout_tokens"] == sum(len(e.labels) for e in tiny_examples(3, seed=9))
    floor, noise = results["hard_label_floor"], accuracy_noise(results["hard_label_floor"], 10**6)
    results["heldout_tokens"] = 10**6
    results["attacks"] = {
        "big": {"no_defense": floor + 2 * noise, "cmiguard": floor},
        "small": {"no_defense": floor + noise / 2, "cmiguard": floor},
    }
    rows = {line.split(" |")[0]: line for line in evaluation_table(results).splitlines()}
    assert "(noise)" not in rows["| big"] and "(noise)" in rows["| small"]
    assert "1000000 held-out tokens" in evaluation_table(results)


def test_tables_stay_rectangular_while_only_the_raw_column_is_done():
    """A run stopped after its first column still writes tables whose every row
    has as many cells as its header."""
    for defenses in (["no_defense"], ["no_defense", "cmiguard", "noise"]):
        results = {
            "attacks": {"forward_kl": dict.fromkeys(defenses, 0.2)},
            "perplexity": {"forward_kl": dict.fromkeys(defenses, 50.0)},
            "hard_label_floor": 0.1,
            "top1_student": 0.15,
            "floor_perplexity": {"sft": 90.0, "top1": 900.0},
            "cmi": dict.fromkeys(defenses, 1.0),
            "teacher_accuracy_raw": 0.4,
        }
        tables, current = [], []
        for line in evaluation_table(results).splitlines() + [""]:
            if line.startswith("|"):
                current.append(line)
            elif current:
                tables, current = [*tables, current], []
        assert len(tables) == 5  # accuracy, its gap, perplexity, its gap, teacher and CMI
        for table in tables:
            assert {line.count("|") for line in table} == {table[0].count("|")}, table


def test_side_by_side_puts_other_runs_defenses_against_the_base_raw_students():
    def result(columns, config=None):
        return {
            "config": config or {"seed": 0},
            "heldout_tokens": 1000,
            "hard_label_floor": 0.1,
            "top1_student": 0.15,
            "floor_perplexity": {"sft": 90.0, "top1": 900.0},
            "teacher_accuracy_raw": 0.4,
            "attacks": {"forward_kl": columns, "kd_t2": {d: v - 0.01 for d, v in columns.items()}},
            "perplexity": {"forward_kl": dict.fromkeys(columns, 50.0)},
            "cmi": {d: v * 10 for d, v in columns.items()},
            "fitted_temperature": {"adaptive_retemper": {d: v * 100 for d, v in columns.items()}},
        }

    base = result({"no_defense": 0.3, "soften": 0.25})
    hot = result({"soften": 0.1, "noise": 0.2})
    merged = side_by_side(base, {"τ = 3.24": (base, "soften"), "τ = 10": (hot, "soften")})
    assert merged["attacks"]["forward_kl"] == {"no_defense": 0.3, "τ = 3.24": 0.25, "τ = 10": 0.1}
    assert merged["attacks"]["kd_t2"]["τ = 10"] == pytest.approx(0.09)
    assert merged["cmi"] == {"no_defense": 3.0, "τ = 3.24": 2.5, "τ = 10": 1.0}
    assert merged["fitted_temperature"]["adaptive_retemper"]["τ = 10"] == pytest.approx(10.0)
    gaps = [line for line in evaluation_table(merged).splitlines() if "| +0.2000 |" in line]
    # gap closed (0.3 - 0.25) / (0.3 - 0.1) = 0.25 and (0.3 - 0.1) / 0.2 = 1.00
    assert gaps == ["| forward_kl | +0.2000 | 0.25 | 1.00 |"]
    with pytest.raises(ValueError, match="'τ = 10' comes from a run with other data"):
        side_by_side(base, {"τ = 10": (result({"soften": 0.1}, {"seed": 1}), "soften")})
    base["rows_digest"], hot["rows_digest"] = "a1", "b2"  # as many rows, other ones
    with pytest.raises(ValueError, match="'τ = 10' comes from a run with other data"):
        side_by_side(base, {"τ = 10": (hot, "soften")})


def test_seed_table_gives_each_seeds_gap_and_their_spread():
    def result(seed, raw, guarded, floor):
        return {
            "config": {"seed": seed},
            "hard_label_floor": floor,
            "top1_student": floor + 0.01,
            "attacks": {"forward_kl": {"no_defense": raw, "cmiguard": guarded}},
            # perplexities e^1 (raw), e^2 (cmiguard), e^3 (floor): log-perplexity gap 0.5
            "perplexity": {"forward_kl": {"no_defense": math.e, "cmiguard": math.e**2}},
            "floor_perplexity": {"sft": math.e**3},
        }

    # gaps 0.5 and 1.0: mean 0.75, sample sd sqrt(2 * 0.25**2) = 0.35
    table = seed_table([result(0, 0.2, 0.15, 0.1), result(1, 0.3, 0.1, 0.1)])
    rows = {line.split(" | ")[1]: line for line in table.splitlines()[2:]}
    assert rows["gap closed, cmiguard"].endswith("| +0.50 | +1.00 | +0.75 ± 0.35 |")
    assert rows["no_defense − floor"].endswith("| +0.1000 | +0.2000 | +0.1500 ± 0.0707 |")
    assert rows["log-perplexity gap closed, cmiguard"].endswith("| +0.50 | +0.50 | +0.50 ± 0.00 |")
    assert "| seed 0 | seed 1 |" in table.splitlines()[0]


def test_seed_table_keeps_a_defense_that_only_some_attacks_ran():
    """A baseline run for one attack on every seed gets its rows there, even
    though another attack every seed shares never ran it."""

    def result(seed):
        return {
            "config": {"seed": seed},
            "hard_label_floor": 0.1,
            "top1_student": 0.11,
            "attacks": {
                "forward_kl": {"no_defense": 0.3, "cmiguard": 0.2, "top1_only": 0.25},
                "reverse_kl": {"no_defense": 0.3, "cmiguard": 0.1},
            },
            "perplexity": {
                "forward_kl": {"no_defense": math.e, "cmiguard": math.e, "top1_only": math.e},
                "reverse_kl": {"no_defense": math.e, "cmiguard": math.e},
            },
            "floor_perplexity": {"sft": math.e**3},
        }

    table = seed_table([result(0), result(1)])
    rows = {tuple(line.split(" | ")[:2]): line for line in table.splitlines()[2:]}
    assert rows[("| forward_kl", "gap closed, top1_only")].endswith("| +0.25 ± 0.00 |")
    assert rows[("| forward_kl", "gap closed, cmiguard")].endswith("| +0.50 ± 0.00 |")
    assert rows[("| reverse_kl", "gap closed, cmiguard")].endswith("| +1.00 ± 0.00 |")
    assert ("| reverse_kl", "gap closed, top1_only") not in rows


def test_a_stopped_evaluation_resumes_to_the_same_numbers(tmp_path):
    """A run stopped after some columns, resumed with more attacks and defenses,
    ends where a run in one go does: cells do not depend on what ran before."""
    transform = LowRankTransform(96, 4, temperature=2.0)
    whole = run(transform)
    first = run_config()
    first.attacks, first.defenses = ("top5", "forward_kl"), ("noise@0.5", "no_defense")
    part = run(transform, tmp_path, first)
    assert set(part["attacks"]["top5"]) == {"noise@0.5", "no_defense"}
    resumed = run(transform, tmp_path)
    assert resumed["seconds"] > part["seconds"]
    for key in ("attacks", "perplexity", "fitted_temperature", "cmi", "teacher_accuracy"):
        assert resumed[key] == whole[key], key
    on_disk = json.loads((tmp_path / "evaluation.json").read_text())
    assert on_disk["attacks"] == whole["attacks"]
    assert "noise" in (tmp_path / "evaluation.md").read_text()


def test_a_run_over_another_subset_keeps_the_earlier_cells(tmp_path):
    transform = LowRankTransform(96, 4, temperature=2.0)
    config = run_config()
    config.attacks = ("forward_kl", "reverse_kl")
    config.defenses = ("no_defense", "top_k@5")
    first = run(transform, tmp_path, config)
    config.attacks, config.defenses = ("top5", "forward_kl"), ("sharpen@0.5",)
    second = run(transform, tmp_path, config)
    on_disk = json.loads((tmp_path / "evaluation.json").read_text())
    for key in ("attacks", "perplexity"):
        assert list(on_disk[key]) == ["forward_kl", "reverse_kl", "top5"]  # ATTACKS' order
        assert list(on_disk[key]["forward_kl"]) == ["no_defense", "sharpen@0.5", "top_k@5"]
        assert on_disk[key]["reverse_kl"] == first[key]["reverse_kl"]
        assert on_disk[key]["forward_kl"]["sharpen@0.5"] == second[key]["forward_kl"]["sharpen@0.5"]
    for key in ("teacher_accuracy", "cmi", "cmi_retempered"):  # the default grid's order
        assert list(on_disk[key]) == ["no_defense", "sharpen@0.5", "top_k@5"]


def test_resume_refuses_another_config_or_a_broken_file(tmp_path):
    transform = LowRankTransform(96, 4, temperature=2.0)
    config = run_config()
    config.attacks, config.defenses = ("forward_kl",), ("no_defense",)
    run(transform, tmp_path, config)
    config.steps = 4
    with pytest.raises(ValueError, match=r"other settings: steps=3 \(given 4\); delete it") as e:
        run(transform, tmp_path, config)
    assert "lr=" not in str(e.value)  # only what differs is named
    config.steps = 3
    config.defenses = ("cmiguard",)
    run(transform, tmp_path, config)
    with pytest.raises(ValueError, match="evaluated another 'cmiguard'"):
        run(LowRankTransform(96, 4, temperature=3.0), tmp_path, config)
    with pytest.raises(ValueError, match="a run on other calibration or held-out rows"):
        run(transform, tmp_path, config, heldout_seed=10)  # as many rows: the counts agree
    state = tmp_path / "evaluation.json"
    state.write_text(state.read_text()[:50])
    with pytest.raises(ValueError, match="not a readable evaluation"):
        run(transform, tmp_path)
