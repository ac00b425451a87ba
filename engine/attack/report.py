"""Tables and plots of an evaluation: student accuracy per attack per defense."""

from __future__ import annotations

import json
import math
from pathlib import Path


def gap_closed(raw: float, defended: float, floor: float) -> float:
    """``(raw − defended) / (raw − floor)``: 1 means distillation reduced to SFT."""
    return (raw - defended) / (raw - floor) if raw != floor else float("nan")


def accuracy_noise(accuracy: float, tokens: int) -> float:
    """Two standard errors of the difference of two accuracies near ``accuracy``
    on ``tokens`` held-out tokens. Token sampling only: the students' own
    training noise comes on top, so a lead below this is certainly noise."""
    return 2 * math.sqrt(2 * accuracy * (1 - accuracy) / tokens)


def _neg_log_perplexity(results: dict) -> tuple[dict, float]:
    """−log perplexity per attack per defense, and of the SFT floor: higher is
    better, like accuracy, so the gap-closed ratio reads the same on it."""
    scores = {a: {d: -math.log(v) for d, v in r.items()} for a, r in results["perplexity"].items()}
    return scores, -math.log(results["floor_perplexity"]["sft"])


def _defenses(results: dict) -> list[str]:
    seen: dict[str, None] = {}
    for row in results["attacks"].values():
        seen |= dict.fromkeys(row)
    return list(seen)


def _cell(value: float | None, fmt: str) -> str:
    return "—" if value is None or math.isnan(value) else format(value, fmt)


def _score_table(scores: dict, defenses: list[str], fmt: str) -> list[str]:
    lines = ["| attack | " + " | ".join(defenses) + " |", "|" + "---|" * (len(defenses) + 1)]
    for attack, row in scores.items():
        lines.append(f"| {attack} | " + " | ".join(_cell(row.get(d), fmt) for d in defenses) + " |")
    return lines


def _gap_table(
    scores: dict, guarded: list[str], floor: float, fmt: str, noise: float | None = None
) -> list[str]:
    """Gap closed per attack per defense, after the raw student's lead over the
    floor (the ratio's denominator: where it is within noise, so is the ratio,
    and the lead is marked "(noise)")."""
    lines = ["| attack | no_defense − floor |" + "".join(f" {d} |" for d in guarded)]
    lines.append("|" + "---|" * (len(guarded) + 2))
    for attack, row in scores.items():
        raw = row.get("no_defense")
        gaps = [
            gap_closed(raw, row[d], floor) if raw is not None and d in row else None
            for d in guarded
        ]
        lead = None if raw is None else raw - floor
        mark = " (noise)" if noise is not None and lead is not None and abs(lead) < noise else ""
        cells = "".join(f" {_cell(g, '.2f')} |" for g in gaps)
        lines.append(f"| {attack} | {_cell(lead, fmt)}{mark} |{cells}")
    return lines


def evaluation_table(results: dict) -> str:
    """Student accuracy, then gap closed per defense, then each defense's
    teacher accuracy and CMI; cells a stopped run has not reached show —."""
    defenses = _defenses(results)
    floor = results["hard_label_floor"]
    lines = ["Held-out next-token accuracy of each student:", ""]
    lines += _score_table(results["attacks"], defenses, ".4f")
    guarded = [d for d in defenses if d != "no_defense"]
    lines += ["", "Gap closed = (no_defense − defended) / (no_defense − SFT floor):", ""]
    tokens = results.get("heldout_tokens")
    noise = None if tokens is None else accuracy_noise(floor, tokens)
    lines += _gap_table(results["attacks"], guarded, floor, "+.4f", noise)
    if noise is not None:
        lines += [
            "",
            f"On {tokens} held-out tokens, two accuracies near the floor differ by up to "
            f"{noise:.4f} (two standard errors) by token sampling alone: leads marked "
            "(noise) are below that, and their ratios mean nothing.",
        ]
    lines += ["", "Held-out perplexity of each student:", ""]
    lines += _score_table(results["perplexity"], defenses, ".0f")
    log_ppl, log_ppl_floor = _neg_log_perplexity(results)
    lines += ["", "Gap closed on log-perplexity (the same ratio, −log ppl for accuracy):", ""]
    lines += _gap_table(log_ppl, guarded, log_ppl_floor, "+.2f")
    teacher = results.get("teacher_accuracy", {})
    retempered = results.get("cmi_retempered", {})
    likelihood = results.get("likelihood_accuracy")
    lines += [
        "",
        "| defense | teacher accuracy | CMI (nats) | CMI of what the re-temperer distils from |"
        + (" log-likelihood accuracy (capitals) |" if likelihood else ""),
        "|---|---|---|---|" + ("---|" if likelihood else ""),
    ]
    for d in results["cmi"]:
        lines.append(
            f"| {d} | {_cell(teacher.get(d), '.4f')} | {_cell(results['cmi'].get(d), '.3f')} "
            f"| {_cell(retempered.get(d), '.3f')} |"
            + (f" {_cell(likelihood.get(d), '.3f')} |" if likelihood else "")
        )
    lines += [
        "",
        f"SFT-only floor: {floor:.4f} (perplexity {results['floor_perplexity']['sft']:.0f}); "
        f"top-1 student: {results['top1_student']:.4f} "
        f"(perplexity {results['floor_perplexity']['top1']:.0f}); "
        f"teacher: {results['teacher_accuracy_raw']:.4f} raw (held-out next-token accuracy; "
        "each defense's is in the table above).",
    ]
    if likelihood:
        lines.append(
            "Log-likelihood accuracy: the held-out capital questions scored by each option's "
            "summed served log-probs, as lm-evaluation-harness scores them."
        )
    for attack, taus in results.get("fitted_temperature", {}).items():
        what = "scale" if attack.startswith("adaptive_blind_inverse") else "τ"
        lines.append(
            f"{attack}: fitted {what} " + ", ".join(f"{d} {t:.2f}" for d, t in taus.items()) + "."
        )
    if "seconds" in results:
        lines.append(f"Run time: {results['seconds'] / 60:.1f} min.")
    return "\n".join(lines)


# an evaluation's results with one value per defense (rather than per attack)
PER_DEFENSE = ("teacher_accuracy", "cmi", "cmi_retempered", "likelihood_accuracy")
SHARED = (
    "config",
    "rows_digest",
    "heldout_tokens",
    "hard_label_floor",
    "floor_perplexity",
    "top1_student",
    "teacher_accuracy_raw",
)


def side_by_side(base: dict, columns: dict[str, tuple[dict, str]]) -> dict:
    """One results dict: ``base``'s raw students and floor, and as each named
    column one defense of another run (``name: (results, defense)``). Runs of
    the same data, seed and students only, so that every column's gap closed is
    against the same raw student: a defense evaluated alone needs no raw
    students of its own."""
    out = {k: base[k] for k in SHARED if k in base}
    out["attacks"], out["perplexity"] = {}, {}
    out |= {k: {} for k in PER_DEFENSE}
    out["fitted_temperature"] = {}
    for name, (run, defense) in {"no_defense": (base, "no_defense"), **columns}.items():
        digests = {r.get("rows_digest") for r in (base, run)} - {None}
        if run["config"] != base["config"] or len(digests) > 1:
            raise ValueError(f"column {name!r} comes from a run with other data, seed or students")
        for key in ("attacks", "perplexity"):
            for attack, row in run[key].items():
                if defense in row:
                    out[key].setdefault(attack, {})[name] = row[defense]
        for key in PER_DEFENSE:
            if defense in run.get(key, {}):
                out[key][name] = run[key][defense]
        for attack, taus in run.get("fitted_temperature", {}).items():
            if defense in taus:
                out["fitted_temperature"].setdefault(attack, {})[name] = taus[defense]
    return out


def seed_table(runs: list[dict]) -> str:
    """Gap closed (on accuracy and on log-perplexity) per seed and its mean ±
    sample sd, for every (attack, defense) cell all runs have: one seed's ratio
    is only as good as its spread."""
    seeds = [r["config"]["seed"] for r in runs]
    attacks = [
        a for a in runs[0]["attacks"] if all("no_defense" in r["attacks"].get(a, {}) for r in runs)
    ]
    log_ppl = [_neg_log_perplexity(r) for r in runs]
    head = "| attack | quantity | " + " | ".join(f"seed {s}" for s in seeds) + " | mean ± sd |"
    lines = [head, "|" + "---|" * (len(seeds) + 3)]

    def row(attack: str, name: str, values: list[float], digits: int) -> None:
        mean = sum(values) / len(values)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / max(1, len(values) - 1))
        cells = " | ".join(f"{v:+.{digits}f}" for v in values)
        lines.append(f"| {attack} | {name} | {cells} | {mean:+.{digits}f} ± {sd:.{digits}f} |")

    row("—", "top-1 student − floor", [r["top1_student"] - r["hard_label_floor"] for r in runs], 4)
    for a in attacks:
        row(
            a,
            "no_defense − floor",
            [r["attacks"][a]["no_defense"] - r["hard_label_floor"] for r in runs],
            4,
        )
        guarded = [
            d
            for d in runs[0]["attacks"][a]
            if d != "no_defense" and all(d in r["attacks"][a] for r in runs)
        ]
        for d in guarded:
            gaps = [
                gap_closed(r["attacks"][a]["no_defense"], r["attacks"][a][d], r["hard_label_floor"])
                for r in runs
            ]
            row(a, f"gap closed, {d}", gaps, 2)
            log_ppl_gaps = [
                gap_closed(scores[a]["no_defense"], scores[a][d], floor)
                for scores, floor in log_ppl
            ]
            row(a, f"log-perplexity gap closed, {d}", log_ppl_gaps, 2)
    return "\n".join(lines)


def write_evaluation(results: dict, out: Path) -> None:
    """``evaluation.json``, ``evaluation.md`` and ``evaluation.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from cmiguard.checkpoint import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    # the JSON is also what a resumed run reads back: never half written
    atomic_write(
        out / "evaluation.json", lambda tmp: Path(tmp).write_text(json.dumps(results, indent=1))
    )
    (out / "evaluation.md").write_text(evaluation_table(results) + "\n")
    attacks = list(results["attacks"])
    defenses = _defenses(results)
    fig, (ax, side) = plt.subplots(
        1, 2, figsize=(max(8, 1.3 * len(attacks) + 4), 4.5), width_ratios=[3, 1]
    )
    width = 0.8 / len(defenses)
    # one colour per defense in both panels, one legend beside them
    colors = {d: plt.get_cmap("tab20")(i % 20) for i, d in enumerate(defenses)}
    values = [v for r in results["attacks"].values() for v in r.values()]
    for i, d in enumerate(defenses):
        xs = [j + (i - len(defenses) / 2 + 0.5) * width for j in range(len(attacks))]
        ys = [results["attacks"][a].get(d, float("nan")) for a in attacks]
        ax.bar(xs, ys, width=width, label=d, color=colors[d])
    ax.axhline(results["hard_label_floor"], color="k", ls="--", lw=1, label="SFT floor")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_ylabel("student next-token accuracy (held-out)")
    lo, hi = min(results["hard_label_floor"], *values), max(values)
    bottom = max(0.0, lo - 0.02)
    ax.set_ylim(bottom, hi + 0.05 * (hi - bottom))
    ax.set_title(f"students (teacher: {results['teacher_accuracy_raw']:.3f})", fontsize=9)
    # does lower CMI mean weaker students? Means over the same attacks for every defense
    shared = [a for a in attacks if all(d in results["attacks"][a] for d in defenses)]
    for d in defenses if shared else ():
        mean = sum(results["attacks"][a][d] for a in shared) / len(shared)
        served = results["cmi"][d]
        side.scatter(served, mean, color=colors[d])
        if d in results.get("cmi_retempered", {}):  # hollow: what the re-temperer distils from
            back = results["cmi_retempered"][d]
            side.scatter(back, mean, facecolors="none", edgecolors=[colors[d]])
            side.plot([served, back], [mean, mean], color=colors[d], lw=0.8)
    side.axhline(results["hard_label_floor"], color="k", ls="--", lw=1)
    side.set_xlabel("CMI of the outputs (nats)\nfilled: served, hollow: re-tempered", fontsize=8)
    side.set_ylabel(f"mean student accuracy, {len(shared)} attacks", fontsize=8)
    if not shared:
        side.set_title("no attack has run against every defense yet", fontsize=7)
    fig.legend(
        *ax.get_legend_handles_labels(),
        fontsize=7,
        loc="center left",
        bbox_to_anchor=(1.0, 0.5),
        ncol=1 + len(defenses) // 16,
    )
    fig.tight_layout()
    fig.savefig(out / "evaluation.png", dpi=120, bbox_inches="tight")
    plt.close(fig)
