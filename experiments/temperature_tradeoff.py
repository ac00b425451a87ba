"""What a serving temperature buys against distillation and what it costs users.

    python experiments/temperature_tradeoff.py runs/full runs/tau-1.5 runs/tau-2.0 runs/tau-10.0 \\
        --lm-eval experiments/lm_eval/results.json --out experiments/results/temperature

The first folder is the full evaluation (its ``no_defense`` column is τ = 1,
its ``soften`` column the demo's τ); each further one a ``cmiguard evaluate
--defenses soften`` run with a transform whose learned map is zero and whose
temperature is τ, same data, seed and students. Gap closed is against the
first folder's raw students. Writes ``tradeoff.{md,json,png}``, and under
``all_attacks/`` every attack that ran at some τ, as one evaluation table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cmiguard.attack.report import gap_closed, side_by_side, write_evaluation  # noqa: E402

ATTACKS = ("forward_kl", "kd_t2", "adaptive_retemper")


def points(runs: list[dict], lm_eval: dict) -> list[dict]:
    """One point per temperature: served CMI, teacher accuracy, lm-eval accuracy,
    and each attack's student and gap closed."""
    full = runs[0]
    for run in runs[1:]:
        if run["config"] != full["config"]:
            raise ValueError("every run must share the first one's data, seed and students")
    raw, floor = full["attacks"], full["hard_label_floor"]

    def point(run: dict, defense: str, tau: float, lm_name: str) -> dict:
        ran = {a: row[defense] for a, row in run["attacks"].items() if defense in row}
        students = {a: ran[a] for a in ATTACKS if a in ran}
        return {
            "tau": tau,
            "cmi": run["cmi"][defense],
            "teacher_accuracy": run["teacher_accuracy"][defense],
            "likelihood_acc": run.get("likelihood_accuracy", {}).get(defense),
            "lm_eval_acc": lm_eval.get(lm_name, {}).get("acc"),
            "students": students,
            "gap_closed": {
                a: gap_closed(raw[a]["no_defense"], s, floor) for a, s in students.items()
            },
        }

    out = [point(full, "no_defense", 1.0, "no_defense")]
    for run in [full, *runs[1:]]:
        tau = run["transform_temperature"]
        out.append(point(run, "soften", tau, f"soften (τ = {tau:.2f} only)"))
    return sorted(out, key=lambda p: p["tau"])


def all_attacks(runs: list[dict]) -> dict:
    """Raw students, and softening at each τ as a column, in one results dict."""
    full = runs[0]
    hotter = sorted(runs, key=lambda r: r["transform_temperature"])
    columns = {f"τ = {r['transform_temperature']:.2f}": (r, "soften") for r in hotter}
    return side_by_side(full, columns)


def _acc(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def table(pts: list[dict]) -> str:
    head = "| τ | served CMI (nats) | teacher accuracy | capitals log-likelihood acc |"
    head += " lm-eval capitals acc |" + "".join(f" {a} gap closed |" for a in ATTACKS)
    rows = [head, "|" + "---|" * (5 + len(ATTACKS))]
    for p in pts:
        lead = f"| {p['tau']:.2f} | {p['cmi']:.3f} | {p['teacher_accuracy']:.4f} |"
        users = f" {_acc(p['likelihood_acc'])} | {_acc(p['lm_eval_acc'])} |"
        gaps = [p["gap_closed"].get(a) for a in ATTACKS]
        cells = "".join(" |" if g is None else f" {g:+.2f} |" for g in gaps)
        rows.append(lead + users + cells)
    return "\n".join(rows)


def plot(pts: list[dict], path: Path) -> None:
    taus = [p["tau"] for p in pts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    left.plot(taus, [p["cmi"] for p in pts], "o-", label="served CMI (nats)")
    for key, style, label in (
        ("likelihood_acc", "s-", "capitals log-likelihood accuracy (users)"),
        ("lm_eval_acc", "x", "the same through the server, lm-eval"),
    ):
        users = [(p["tau"], p[key]) for p in pts if p[key] is not None]
        if users:
            left.plot(*zip(*users, strict=True), style, label=label)
    left.set_xscale("log")
    left.plot(taus, [p["teacher_accuracy"] for p in pts], "^-", label="next-token accuracy")
    left.set_xlabel("serving temperature τ (no learned map)")
    left.set_title("what softening costs")
    left.legend(fontsize=8)
    for a in ATTACKS:
        ran = [(p["tau"], p["gap_closed"][a]) for p in pts if a in p["gap_closed"]]
        if ran:
            right.plot(*zip(*ran, strict=True), "o-", label=a)
    right.set_xscale("log")
    right.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="must-show: 0.5")
    right.axhline(0.0, color="black", linewidth=0.5)
    right.set_xlabel("serving temperature τ (no learned map)")
    right.set_ylabel("gap closed (student accuracy)")
    right.set_title("what it buys against distillation")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument(
        "--lm-eval", type=Path, required=True, help="experiments/lm_eval/results.json"
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    runs = [json.loads((r / "evaluation.json").read_text()) for r in args.runs]
    pts = points(runs, json.loads(args.lm_eval.read_text()))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tradeoff.md").write_text(table(pts) + "\n")
    (args.out / "tradeoff.json").write_text(json.dumps(pts, indent=2) + "\n")
    plot(pts, args.out / "tradeoff.png")
    write_evaluation(all_attacks(runs), args.out / "all_attacks")
    print(table(pts))


if __name__ == "__main__":
    main()
