"""``cmiguard evaluate``: distil students from the raw, the defended and the
purified teacher with each attack, and score them on held-out text.

Every student starts from the same initialisation (the teacher's first
``student_layers`` blocks, final norm and LM head), sees the same batches in
the same order for the same number of steps, and differs only in what the
teacher's answers looked like (the defense) and how it learns from them (the
attack). The floor is a student trained on the ground truth alone (SFT).
"""

from __future__ import annotations

import copy
import functools
import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from cmiguard.attack.adaptive import (
    fit_blind_inverse,
    fit_hidden_mass,
    fit_linear_inverse,
    floor_truncated,
    with_hidden_mass,
)
from cmiguard.attack.defenses import DEFENSES, defense_fn, describe, keep_top
from cmiguard.attack.losses import DIVERGENCES, distillation_loss
from cmiguard.checkpoint import changed_settings
from cmiguard.kernels.reference import IGNORE_INDEX
from cmiguard.purify import cmi
from cmiguard.tempering import fit_temperature, retemper
from cmiguard.train.data import ChoiceQuestion, Example, batches, collate, rows_digest
from cmiguard.train.models import logits_rows, truncated_copy
from cmiguard.transforms import LogitTransform

ATTACKS: dict[str, dict] = {name: {"attack": name} for name in DIVERGENCES}
ATTACKS |= {
    "top5": {"attack": "forward_kl", "top_k": 5},
    "top20": {"attack": "forward_kl", "top_k": 20},
    "kd_t2": {"attack": "forward_kl", "temperature": 2.0},
    # distil from the argmax of whatever is served: what any API leaks, even text
    "hard_label": {"attack": "forward_kl", "hard_label": True},
    "adaptive_retemper": {"attack": "forward_kl", "adaptive": "retemper"},
    # re-tempered, then mode-seeking: reverse KL is the raw teacher's best student
    # on accuracy here, and an overconfident output breaks it unless re-tempered first
    "adaptive_retemper_reverse_kl": {"attack": "reverse_kl", "adaptive": "retemper"},
    # knows the family (a low-rank affine map), not its parameters; never sees raw logits
    "adaptive_blind_inverse": {"attack": "forward_kl", "adaptive": "blind_inverse"},
    "adaptive_blind_inverse_reverse_kl": {"attack": "reverse_kl", "adaptive": "blind_inverse"},
    # re-tempers what is shown, gives what is hidden the mass the ground truth says
    # (not floor_truncated's 1e-4) as one bucket; measured, it does not beat the blind
    # inverse on top-k (docs/EVALUATION.md)
    "adaptive_bucket": {"attack": "forward_kl", "adaptive": "bucket", "bucket": True},
    "adaptive_bucket_reverse_kl": {"attack": "reverse_kl", "adaptive": "bucket", "bucket": True},
    # oracle (served, raw) pairs: an upper bound on inverting, not a realistic attacker
    "adaptive_linear": {"attack": "forward_kl", "adaptive": "linear"},
}
QUICK_ATTACKS = ("forward_kl", "reverse_kl", "top5")


@dataclass
class EvalConfig:
    attacks: Sequence[str] = tuple(ATTACKS)
    defenses: Sequence[str] = DEFENSES
    # 4 blocks, lr 5e-4, 8 sequences a step: after 60 steps KD beats SFT on
    # held-out next-token accuracy (17.8% vs 14.9%), so the attacks have signal
    student_layers: int = 4
    steps: int = 60
    batch_size: int = 8
    lr: float = 5e-4
    alpha: float = 0.5
    # the adaptive attackers fit on this many of their training batches
    oracle_batches: int = 2
    # the blind inverse attacker's guess of the transform's rank
    inverse_rank: int = 32
    seed: int = 0
    # torch.compile the loss: 3-7x faster on CPU over a 49k vocabulary, ~15 s to compile
    compile_loss: bool = True
    # students in bf16 autocast (fp32 weights and loss): 1.7x faster on a CPU with
    # AVX512-BF16; a run is all one or all the other (it is part of the key)
    autocast: bool = False
    progress: bool = True

    def key(self) -> dict:
        """What a resumed run must match: every setting that changes a cell's
        number (cells are independent, so attacks and defenses can be added)."""
        skip = ("attacks", "defenses", "progress")
        return {k: v for k, v in asdict(self).items() if k not in skip}


@dataclass
class CachedBatch:
    input_ids: Tensor
    attention_mask: Tensor
    rows: Tensor
    labels: Tensor
    teacher_logits: Tensor  # [N, V] bf16


def batch_order(n: int, seed: int) -> list[int]:
    """The order a seed's students see the ``n`` calibration examples in; the
    adaptive attackers fit on its first ``oracle_batches`` batches."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()


def cache_teacher(
    teacher: nn.Module, examples: Sequence[Example], pad: int, config: EvalConfig
) -> list[CachedBatch]:
    """The teacher's logits for every training batch, once (bf16 to halve memory)."""
    order = batch_order(len(examples), config.seed)
    out = []
    with torch.no_grad():
        for b in tqdm(
            batches(examples, config.batch_size, pad, order),
            desc="teacher logits",
            disable=not config.progress,
        ):
            z = logits_rows(teacher, b.input_ids, b.attention_mask, b.rows)
            out.append(CachedBatch(b.input_ids, b.attention_mask, b.rows, b.labels, z.bfloat16()))
    return out


def attacker_view(
    defend: Callable[[Tensor], Tensor], spec: dict, cached: list[CachedBatch], config: EvalConfig
) -> tuple[Callable[[Tensor], Tensor], float | None]:
    """What the attacker distils from: the defended log-probs after its adaptive
    step (fitted on its first ``oracle_batches`` batches) or reduced to its
    argmax (``hard_label``), truncated outputs floored so every divergence
    stays finite (the bucketing attacker instead gives them its fitted hidden
    mass, compared as one bucket). Also the fitted temperature (the blind
    inverse's scale)."""
    if spec.get("hard_label"):
        return lambda z: floor_truncated(keep_top(defend(z), 1)), None
    fit = cached[: config.oracle_batches]
    adaptive = spec.get("adaptive")
    if adaptive is None:
        return lambda z: floor_truncated(defend(z)), None
    seen = torch.cat([defend(b.teacher_logits.float()) for b in fit])
    labels = torch.cat([b.labels for b in fit])
    if adaptive == "retemper":
        tau = fit_temperature(seen, labels)
        return lambda z: floor_truncated(retemper(defend(z), tau)), tau
    if adaptive == "bucket":
        tau, mass = fit_temperature(seen, labels), fit_hidden_mass(seen, labels)
        return lambda z: with_hidden_mass(retemper(defend(z), tau), mass), tau
    if adaptive == "blind_inverse":
        blind = fit_blind_inverse(seen, labels, config.inverse_rank, seed=config.seed)
        return lambda z: floor_truncated(blind(defend(z))), blind.scale
    raw = torch.cat([b.teacher_logits.float() for b in fit])
    invert = fit_linear_inverse(seen, raw)
    return lambda z: floor_truncated(invert(defend(z))), None


def train_student(
    template: nn.Module,
    cached: list[CachedBatch],
    target: Callable[[Tensor], Tensor] | None,
    spec: dict,
    config: EvalConfig,
    hard_labels: bool = False,
    desc: str = "student",
) -> nn.Module:
    """One student: ``steps`` AdamW steps over the cached batches (cycled).

    ``target`` maps the teacher's logits to the log-probs the attacker learns
    from; ``None`` trains on the ground truth only (SFT); ``hard_labels``
    replaces the labels with the teacher's top-1 tokens (SFT on them).
    """
    loss_fn = compiled_loss() if config.compile_loss else distillation_loss
    torch.manual_seed(config.seed)
    student = copy.deepcopy(template).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(student.parameters(), lr=config.lr)
    for step in tqdm(range(config.steps), desc=desc, disable=not config.progress, leave=False):
        b = cached[step % len(cached)]
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.autocast):
            s = logits_rows(student, b.input_ids, b.attention_mask, b.rows)
        labels = b.teacher_logits.float().argmax(-1) if hard_labels else b.labels
        if target is None:
            loss = torch.nn.functional.cross_entropy(s.float(), labels, ignore_index=IGNORE_INDEX)
        else:
            loss = loss_fn(
                s,
                target(b.teacher_logits.float()),
                labels,
                spec["attack"],
                config.alpha,
                spec.get("temperature", 1.0),
                spec.get("top_k"),
                spec.get("bucket", False),
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return student.eval().requires_grad_(False)


@functools.cache
def compiled_loss() -> Callable[..., Tensor]:
    """:func:`distillation_loss` compiled once, shapes dynamic, its float
    arguments (α and the temperature: two values in an evaluation) compiled in
    as constants: symbolic, torch 2.11 and 2.12 (not 2.13) get the top-k
    loss's gradient wrong, 70% off on a test batch."""
    compiled = torch.compile(distillation_loss, dynamic=True)
    return torch._dynamo.config.patch(specialize_float=True)(compiled)


@torch.no_grad()
def score(
    model: nn.Module, examples: Sequence[Example], pad: int, batch_size: int = 8
) -> dict[str, float]:
    """Next-token accuracy and perplexity against the ground truth."""
    correct = total = 0
    nll = 0.0
    for b in batches(examples, batch_size, pad):
        z = logits_rows(model, b.input_ids, b.attention_mask, b.rows)
        correct += int((z.argmax(-1) == b.labels).sum())
        nll += float(torch.nn.functional.cross_entropy(z, b.labels, reduction="sum"))
        total += b.labels.numel()
    return {"accuracy": correct / total, "perplexity": math.exp(nll / total)}


def evaluate(
    teacher: nn.Module,
    transforms: Mapping[str, LogitTransform],
    calibration: Sequence[Example],
    heldout: Sequence[Example],
    pad: int,
    config: EvalConfig,
    out: Path | None = None,
    choices: Sequence[ChoiceQuestion] = (),
) -> dict:
    """Students per (attack, defense), the SFT floor, the top-1 student and the teacher.

    ``transforms`` holds the learned defenses by name (``cmiguard``,
    ``cmiguard@label``: see :mod:`cmiguard.attack.defenses`). With ``choices``
    each defense's teacher is also scored as a log-likelihood client
    (lm-evaluation-harness) scores it: ``likelihood_accuracy``.

    With ``out``, the report (``evaluation.{json,md,png}``) is rewritten after
    every student, and a rerun into the same folder with the same config picks
    up where the last one stopped. Defenses are the outer loop so a stopped run
    has whole columns; ``seconds`` adds up the time of every run.
    """
    from cmiguard.attack.report import PER_DEFENSE, write_evaluation

    start = time.perf_counter()
    data = {"calibration_examples": len(calibration), "heldout_examples": len(heldout)}
    specs = {d: describe(d, transforms) for d in config.defenses}
    results = _resume(out, config, specs, data, rows_digest([*calibration, *heldout]))
    results["heldout_tokens"] = sum(len(e.labels) for e in heldout)
    spent = results["seconds"]
    cached = cache_teacher(teacher, calibration, pad, config)
    template = truncated_copy(teacher, config.student_layers)

    # the likelihood column only where there are questions to score
    per_defense = tuple(k for k in PER_DEFENSE if choices or k != "likelihood_accuracy")

    order = list(dict.fromkeys(["no_defense", *config.defenses, *DEFENSES]))

    def save() -> None:
        """Write the report, every table in the configured order."""
        results["seconds"] = spent + time.perf_counter() - start
        for key in ("attacks", "perplexity", "fitted_temperature"):
            results[key] = {
                a: {d: results[key][a][d] for d in _ordered(results[key][a], order)}
                for a in _ordered(results[key], list(ATTACKS))
            }
        for key in per_defense:
            results[key] = {d: results[key][d] for d in _ordered(results[key], order)}
        if out is not None:
            write_evaluation(results, out)

    if "hard_label_floor" not in results:
        floor = score(
            train_student(template, cached, None, {}, config, desc="SFT floor"), heldout, pad
        )
        top1 = train_student(
            template, cached, None, {}, config, hard_labels=True, desc="top-1 student"
        )
        top1 = score(top1, heldout, pad)
        results["hard_label_floor"] = floor["accuracy"]
        results["top1_student"] = top1["accuracy"]
        results["floor_perplexity"] = {"sft": floor["perplexity"], "top1": top1["perplexity"]}
    if any(not set(config.defenses) <= set(results.get(k, {})) for k in per_defense):
        new = _teacher_and_cmi(teacher, transforms, cached, heldout, pad, config, choices)
        results |= new | {k: results.get(k, {}) | new[k] for k in per_defense}
    cells = [(d, a) for d in config.defenses for a in config.attacks]
    done = {(d, a) for a, row in results["attacks"].items() for d in row}
    for d, a in tqdm(
        [cell for cell in cells if cell not in done], desc="students", disable=not config.progress
    ):
        defend = defense_fn(d, transforms, config.seed)
        view, tau = attacker_view(defend, ATTACKS[a], cached, config)
        student = train_student(template, cached, view, ATTACKS[a], config, desc=f"{a}/{d}")
        s = score(student, heldout, pad)
        results["attacks"].setdefault(a, {})[d] = s["accuracy"]
        results["perplexity"].setdefault(a, {})[d] = s["perplexity"]
        if tau is not None:
            results["fitted_temperature"].setdefault(a, {})[d] = tau
        save()
    save()
    return results


def _ordered(names: Sequence[str], order: Sequence[str]) -> list[str]:
    """``names`` in the registry's order, whatever order runs into the same
    folder made them in (a run over a subset keeps the cells earlier ones made)."""
    rank = {n: i for i, n in enumerate(order)}
    return sorted(names, key=lambda n: rank.get(n, len(rank)))


def _resume(
    out: Path | None, config: EvalConfig, specs: dict[str, str], data: dict, digest: str
) -> dict:
    """The results so far in ``out`` (or fresh ones), refusing a folder whose
    run had other settings, other rows, or another transform under one of
    these names."""
    fresh = {
        "seconds": 0.0,
        "config": config.key() | data,
        "rows_digest": digest,
        "defense_specs": specs,
        "attacks": {},
        "perplexity": {},
        "fitted_temperature": {},
    }
    state = None if out is None else out / "evaluation.json"
    if state is None or not state.exists():
        return fresh
    try:
        old = json.loads(state.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{state} is not a readable evaluation ({err}); delete it") from err
    if old.get("config") != fresh["config"]:
        raise ValueError(
            f"{state} holds a run with other settings: "
            f"{changed_settings(old.get('config') or {}, fresh['config'])}; delete it or choose "
            "another output folder"
        )
    if old.setdefault("rows_digest", digest) != digest:  # (none before 2026-12-07)
        raise ValueError(
            f"{state} holds a run on other calibration or held-out rows; delete it or choose "
            "another output folder"
        )
    known = old.setdefault("defense_specs", {})
    for name, spec in specs.items():
        if known.setdefault(name, spec) != spec:
            raise ValueError(
                f"{state} evaluated another {name!r} ({known[name]}, now {spec}): give the new "
                "one another name (cmiguard@label) or choose another output folder"
            )
    return old


def _teacher_and_cmi(
    teacher: nn.Module,
    transforms: Mapping[str, LogitTransform],
    cached: list[CachedBatch],
    heldout: Sequence[Example],
    pad: int,
    config: EvalConfig,
    choices: Sequence[ChoiceQuestion] = (),
) -> dict:
    """Held-out next-token accuracy of the argmax of each defense's output (one
    teacher pass), and the CMI of what each defense hands out on 8 batches: as
    served, and as the ``adaptive_retemper`` attacker sees it (CMI falls as the
    temperature rises, so a served temperature lowers it without hiding
    anything); with ``choices``, the :func:`likelihood_accuracy`."""
    names = dict.fromkeys(["no_defense", *config.defenses])
    fns = {d: defense_fn(d, transforms, config.seed) for d in names}
    correct = dict.fromkeys(fns, 0)
    total = 0
    with torch.no_grad():
        for b in batches(heldout, 8, pad):
            z = logits_rows(teacher, b.input_ids, b.attention_mask, b.rows)
            for d, fn in fns.items():
                correct[d] += int((fn(z).argmax(-1) == b.labels).sum())
            total += b.labels.numel()
    accuracy = {d: c / total for d, c in correct.items()}
    sample = cached[:8]
    labels = torch.cat([b.labels for b in sample])
    served_cmi, retempered_cmi = {}, {}
    for d in names:
        fn = defense_fn(d, transforms, config.seed)  # fresh noise
        served_cmi[d] = float(
            cmi(torch.cat([fn(b.teacher_logits.float()) for b in sample]), labels)
        )
        view, _ = attacker_view(fn, ATTACKS["adaptive_retemper"], cached, config)
        retempered = torch.cat([view(b.teacher_logits.float()) for b in sample])
        retempered_cmi[d] = float(cmi(retempered, labels))
    out = {
        "teacher_accuracy": accuracy,
        "teacher_accuracy_raw": accuracy["no_defense"],
        "cmi": served_cmi,
        "cmi_retempered": retempered_cmi,
    }
    if choices:
        out["likelihood_accuracy"] = likelihood_accuracy(teacher, choices, fns)
    return out


@torch.no_grad()
def likelihood_accuracy(
    model: nn.Module,
    questions: Sequence[ChoiceQuestion],
    defenses: dict[str, Callable[[Tensor], Tensor]],
    chunk: int = 16,
) -> dict[str, float]:
    """Per defense, how often the gold option's tokens have the highest summed
    served log-prob: what a client that scores sequences gets (argmax
    accuracy says nothing of it: a temperature keeps every argmax).
    ``chunk`` questions share a forward pass."""
    correct = dict.fromkeys(defenses, 0)
    for first in range(0, len(questions), chunk):
        group = questions[first : first + chunk]
        # one sequence per option; its rows are those that predict the option's tokens
        options = [
            Example(q.context + o, list(range(len(q.context) - 1, len(q.context) + len(o) - 1)), o)
            for q in group
            for o in q.options
        ]
        b = collate(options, 0)  # right padding: no scored row sees a pad
        z = logits_rows(model, b.input_ids, b.attention_mask, b.rows)
        for d, defend in defenses.items():
            served = defend(z).gather(1, b.labels[:, None])[:, 0]
            sums = torch.zeros(len(options)).index_add_(0, b.rows[:, 0], served)
            per_question = sums.split([len(q.options) for q in group])
            correct[d] += sum(
                int(s.argmax()) == q.gold for q, s in zip(group, per_question, strict=True)
            )
    return {d: c / len(questions) for d, c in correct.items()}
