"""Tables and plots of an evaluation: student accuracy per attack per defense."""

from __future__ import annotations

import json
from pathlib import Path


def gap_closed(raw: float, defended: float, floor: float) -> float:
    """``(raw − defended) / (raw − floor)``: 1 means distillation reduced to SFT."""
    return (raw - defended) / (raw - floor) if raw != floor else float("nan")


def evaluation_table(results: dict) -> str:
    defenses = list(next(iter(results["attacks"].values())))
    head = "| attack | " + " | ".join(defenses) + " | gap closed (cmiguard) |"
    lines = [head, "|" + "---|" * (len(defenses) + 2)]
    floor = results["hard_label_floor"]
    for attack, row in results["attacks"].items():
        cells = [f"{row[d]:.4f}" for d in defenses]
        gap = (
            gap_closed(row["no_defense"], row["cmiguard"], floor)
            if "cmiguard" in row
            else float("nan")
        )
        lines.append(f"| {attack} | " + " | ".join(cells) + f" | {gap:.2f} |")
    lines.append("")
    lines.append(f"SFT-only floor: {floor:.4f}; top-1 student: {results['top1_student']:.4f}; ")
    lines.append(
        f"teacher: {results['teacher_accuracy_raw']:.4f} raw, "
        f"{results['teacher_accuracy_purified']:.4f} purified (held-out next-token accuracy)"
    )
    lines.append(
        "CMI of what each defense hands out (nats): "
        + ", ".join(f"{k} {v:.3f}" for k, v in results["cmi"].items())
    )
    return "\n".join(lines)


def write_evaluation(results: dict, out: Path) -> None:
    """``evaluation.json``, ``evaluation.md`` and ``evaluation.png`` under ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(results, indent=1))
    (out / "evaluation.md").write_text(evaluation_table(results) + "\n")
    attacks = list(results["attacks"])
    defenses = list(next(iter(results["attacks"].values())))
    fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(attacks)), 4))
    width = 0.8 / len(defenses)
    for i, d in enumerate(defenses):
        xs = [j + (i - len(defenses) / 2 + 0.5) * width for j in range(len(attacks))]
        ax.bar(xs, [results["attacks"][a][d] for a in attacks], width=width, label=d)
    ax.axhline(results["hard_label_floor"], color="k", ls="--", lw=1, label="SFT floor")
    ax.axhline(results["teacher_accuracy_raw"], color="grey", ls=":", lw=1, label="teacher")
    ax.set_xticks(range(len(attacks)), attacks, rotation=30, ha="right")
    ax.set_ylabel("student next-token accuracy (held-out)")
    lo = min(
        results["hard_label_floor"], *(v for r in results["attacks"].values() for v in r.values())
    )
    ax.set_ylim(max(0.0, lo - 0.05), results["teacher_accuracy_raw"] + 0.02)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "evaluation.png", dpi=120)
    plt.close(fig)
