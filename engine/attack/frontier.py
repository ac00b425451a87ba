"""The plane a defense is judged on (docs/DESIGN.md, "Judging a defense").

x = honest users' log-likelihood accuracy; y = the gap closed under the
strongest of several attackers, against the SFT floor and against the top-1
student (for a defense that keeps the argmax the reachable floor), read on
two measures of the students: held-out next-token accuracy, and held-out
log-likelihood (nats a token, ``−log perplexity``), which at this budget
moves several times less from seed to seed (``seed_sd``; docs/EVALUATION.md). Every
defense is a point, a family (temperature, top-k, noise, cmiguard over its
training trajectory) a curve over its knob. The numbers come from
:func:`cmiguard.attack.evaluation.evaluate` runs, one per seed, of the same
data and students.

Two readings of y (:data:`READINGS`): ``y`` reads each attack against the raw
teacher's student *under the same attack* and takes the attack the defense
stops least; ``y_best`` reads the attacker's best student (the best of the
attacks, per seed) against its best student from the raw teacher. They part
where an attack is weak on raw logits too (reverse KL at this budget): a
defense that helps only that attack looks strong on ``y`` and not on ``y_best``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from torch import nn

from cmiguard.attack.defenses import parse
from cmiguard.attack.evaluation import EvalConfig, evaluate
from cmiguard.attack.report import gap_closed
from cmiguard.train.data import ChoiceQuestion, Example
from cmiguard.transforms import LogitTransform

# the strongest of these decides a point's y: two naive losses and the
# adaptive attackers that never see raw logits (the re-temperer with each loss)
FRONTIER_ATTACKS = (
    "forward_kl",
    "reverse_kl",
    "adaptive_retemper",
    "adaptive_blind_inverse",
    "adaptive_retemper_reverse_kl",
)
# the scales a gap is read on: (student measure, floor)
SCALES = {
    "sft": ("accuracy", "sft"),
    "top1": ("accuracy", "top1"),
    "sft_nll": ("nll", "sft"),
    "top1_nll": ("nll", "top1"),
}
MEASURE_NAMES = {"accuracy": "accuracy", "nll": "log-lik."}
FLOOR_NAMES = {"sft": "SFT", "top1": "top-1"}
SCALE_NAMES = {s: f"{MEASURE_NAMES[m]} vs {FLOOR_NAMES[f]}" for s, (m, f) in SCALES.items()}
# a point's two readings of y (module docstring)
READINGS = {
    "y": "each attack against the raw teacher's student under the same attack",
    "y_best": "the attacker's best student against its best from the raw teacher",
}


def _score(cell: dict, measure: str) -> float:
    """Higher is better on both measures: accuracy, or ``−log perplexity``."""
    return cell["accuracy"] if measure == "accuracy" else -math.log(cell["perplexity"])


def _floor_score(floors: dict, floor: str, measure: str) -> float:
    if measure == "accuracy":
        return floors[floor]
    return -math.log(floors[f"{floor}_perplexity"])


def _mean(values: Sequence[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return sum(values) / len(values) if values else float("nan")


def _sd(values: Sequence[float]) -> float:
    if len(values) < 2:
        return float("nan")
    mean = _mean(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def frontier(runs: Sequence[dict], attacks: Sequence[str] = FRONTIER_ATTACKS) -> dict:
    """One point per defense the runs share (every attack, every seed), with
    everything a gap is computed from: per attack and seed the student's
    accuracy and perplexity, and per seed both floors. Gaps, the strongest
    attack, y and the best-student reading (``best_attack`` and ``best_gap``
    per seed, ``y_best``) are keyed by scale (:data:`SCALES`)."""
    if not runs:
        raise ValueError("frontier needs at least one evaluation run")
    base = {k: v for k, v in runs[0]["config"].items() if k != "seed"}
    for run in runs:
        if {k: v for k, v in run["config"].items() if k != "seed"} != base:
            raise ValueError("every run must share the data and students; only seeds differ")
    seeds = [str(run["config"]["seed"]) for run in runs]
    floors = {
        seed: {
            "sft": run["hard_label_floor"],
            "top1": run["top1_student"],
            "sft_perplexity": run["floor_perplexity"]["sft"],
            "top1_perplexity": run["floor_perplexity"]["top1"],
        }
        for seed, run in zip(seeds, runs, strict=True)
    }
    defenses = [
        d
        for d in runs[0]["attacks"].get(attacks[0], {})
        if all(d in run["attacks"].get(a, {}) for run in runs for a in attacks)
    ]
    if "no_defense" not in defenses:
        return {
            "seeds": seeds,
            "attacks": list(attacks),
            "floors": floors,
            "points": [],
            "seed_sd": seed_sd([]),
        }

    def students(defense: str) -> dict:
        return {
            a: {
                seed: {
                    "accuracy": run["attacks"][a][defense],
                    "perplexity": run["perplexity"][a][defense],
                }
                for seed, run in zip(seeds, runs, strict=True)
            }
            for a in attacks
        }

    raw = students("no_defense")
    points = []
    for d in defenses:
        family, knob = parse(d)
        cells = students(d)
        gaps = {
            scale: {
                a: {
                    seed: gap_closed(
                        _score(raw[a][seed], measure),
                        _score(cells[a][seed], measure),
                        _floor_score(floors[seed], floor, measure),
                    )
                    for seed in seeds
                }
                for a in attacks
            }
            for scale, (measure, floor) in SCALES.items()
        }
        mean_gaps = {f: {a: _mean(list(g[a].values())) for a in attacks} for f, g in gaps.items()}
        strongest = {
            f: min(attacks, key=lambda a, f=f: mean_gaps[f][a]) for f in SCALES
        }  # the attacker the defense stops least
        best_attack = {
            scale: {
                seed: max(attacks, key=lambda a, m=measure, s=seed: _score(cells[a][s], m))
                for seed in seeds
            }
            for scale, (measure, _) in SCALES.items()
        }
        best_gap = {
            scale: {
                seed: gap_closed(
                    max(_score(raw[a][seed], measure) for a in attacks),
                    _score(cells[best_attack[scale][seed]][seed], measure),
                    _floor_score(floors[seed], floor, measure),
                )
                for seed in seeds
            }
            for scale, (measure, floor) in SCALES.items()
        }
        per_defense = {
            key: _mean([run[key][d] for run in runs if d in run.get(key, {})])
            for key in ("likelihood_accuracy", "teacher_accuracy", "cmi", "cmi_retempered")
        }
        points.append(
            {
                "defense": d,
                "family": family,
                "knob": knob,
                **per_defense,
                "students": cells,
                "gap_closed": gaps,
                "mean_gap_closed": mean_gaps,
                "strongest_attack": strongest,
                "y": {f: mean_gaps[f][strongest[f]] for f in SCALES},
                "y_sd": {f: _sd(list(gaps[f][strongest[f]].values())) for f in SCALES},
                "best_attack": best_attack,
                "best_gap": best_gap,
                "y_best": {f: _mean(list(best_gap[f].values())) for f in SCALES},
                "y_best_sd": {f: _sd(list(best_gap[f].values())) for f in SCALES},
            }
        )
    return {
        "seeds": seeds,
        "attacks": list(attacks),
        "floors": floors,
        "points": points,
        "seed_sd": seed_sd(points),
    }


def seed_sd(points: Sequence[dict]) -> dict[str, float]:
    """Per scale, the median over (defended point, attack) of the gap's sd over
    seeds: how far one seed's gap is to be trusted (NaN with one seed)."""
    out = {}
    for scale in SCALES:
        sds = sorted(
            _sd(list(p["gap_closed"][scale][a].values()))
            for p in points
            if p["family"] != "no_defense"
            for a in p["gap_closed"][scale]
        )
        sds = [v for v in sds if not math.isnan(v)]
        out[scale] = sds[len(sds) // 2] if sds else float("nan")
    return out


def curves(front: dict) -> dict[str, list[dict]]:
    """Each family's points in knob order (cmiguard: the order given), every
    baseline curve starting at the raw teacher (each knob's identity end)."""
    raw = [p for p in front["points"] if p["family"] == "no_defense"]
    out: dict[str, list[dict]] = {}
    for p in front["points"]:
        if p["family"] != "no_defense":
            out.setdefault(p["family"], []).append(p)
    for family, members in out.items():
        if family == "cmiguard":
            continue
        # soften/top_k/noise move away from the raw teacher as τ, 1/k and σ grow
        key = {"top_k": lambda p: -p["knob"]}.get(family, lambda p: p["knob"])
        out[family] = [*raw, *sorted(members, key=key)]
    return out


def _curve_at(curve: list[dict], x: float, scale: str, reading: str) -> float | None:
    """The baseline curve's y at users' accuracy ``x`` (linear between its
    points in x), or None where the curve does not reach ``x``."""
    xy = sorted((p["likelihood_accuracy"], p[reading][scale]) for p in curve)
    for (x0, y0), (x1, y1) in zip(xy, xy[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return None


def verdicts(front: dict, reading: str = "y") -> list[dict]:
    """For each cmiguard point and scale: each baseline curve's y at its x and
    whether the point lies above it, and whether any baseline point dominates
    it (as much utility and as large a gap closed); y read as ``reading``
    (:data:`READINGS`)."""
    families = curves(front)
    baselines = {f: c for f, c in families.items() if f != "cmiguard"}
    out = []
    for p in families.get("cmiguard", []):
        for scale in SCALES:
            x, y = p["likelihood_accuracy"], p[reading][scale]
            at = {f: _curve_at(c, x, scale, reading) for f, c in baselines.items()}
            dominated = [
                q["defense"]
                for c in baselines.values()
                for q in c
                if q["likelihood_accuracy"] >= x and q[reading][scale] >= y
            ]
            above = all(v is not None and y > v for v in at.values()) and not dominated
            out.append(
                {
                    "defense": p["defense"],
                    "scale": scale,
                    "x": x,
                    "y": y,
                    "curves": at,
                    "dominated_by": sorted(set(dominated)),
                    "above_every_baseline": above,
                }
            )
    return out


def _cell(value: float | None, fmt: str = ".2f") -> str:
    return (
        "—"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else format(value, fmt)
    )


def frontier_table(front: dict) -> str:
    """Markdown: one row per point, the gaps per attack, then the verdict per
    cmiguard point."""
    lines = [
        f"Seeds: {', '.join(front['seeds'])}; attacks: {', '.join(front['attacks'])}. "
        "y = mean gap closed over seeds under the strongest attack (± sd over seeds), "
        f"{READINGS['y']}, "
        "on the students' held-out accuracy and on their held-out log-likelihood "
        "(−log perplexity), each against the SFT floor and the top-1 student. "
        "A gap's sd over seeds (median over points and attacks): "
        + ", ".join(f"{SCALE_NAMES[s]} {_cell(front['seed_sd'][s])}" for s in SCALES)
        + ".",
        "",
        "| defense | users' log-lik. acc. | teacher acc. | CMI served / re-tempered | "
        + " | ".join(f"y, {SCALE_NAMES[s]} | strongest" for s in SCALES)
        + " |",
        "|---|---|---|---|" + "---|---|" * len(SCALES),
    ]
    for p in front["points"]:
        ys = [
            f"{_cell(p['y'][s])} ± {_cell(p['y_sd'][s])} | {p['strongest_attack'][s]}"
            for s in SCALES
        ]
        lines.append(
            f"| {p['defense']} | {_cell(p['likelihood_accuracy'], '.3f')} | "
            f"{_cell(p['teacher_accuracy'], '.4f')} | {_cell(p['cmi'], '.3f')} / "
            f"{_cell(p['cmi_retempered'], '.3f')} | " + " | ".join(ys) + " |"
        )
    for measure, name in MEASURE_NAMES.items():
        sft, top1 = (s for s, (m, _) in SCALES.items() if m == measure)
        lines += [
            "",
            f"Gap closed on {name} per attack (mean over seeds), vs the SFT floor / "
            "the top-1 student:",
            "",
            "| defense | " + " | ".join(front["attacks"]) + " |",
            "|---|" + "---|" * len(front["attacks"]),
        ]
        for p in front["points"]:
            g = p["mean_gap_closed"]
            cells = [f"{_cell(g[sft][a])} / {_cell(g[top1][a])}" for a in front["attacks"]]
            lines.append(f"| {p['defense']} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"y read as {READINGS['y_best']} (per seed: the best of the attacks on each side; "
        "mean ± sd over seeds, and the attack that made the best student on each seed):",
        "",
        "| defense | users' log-lik. acc. | "
        + " | ".join(f"y, {SCALE_NAMES[s]} | best student" for s in SCALES)
        + " |",
        "|---|---|" + "---|---|" * len(SCALES),
    ]
    for p in front["points"]:
        ys = [
            f"{_cell(p['y_best'][s])} ± {_cell(p['y_best_sd'][s])} | "
            + "/".join(p["best_attack"][s].values())
            for s in SCALES
        ]
        lines.append(
            f"| {p['defense']} | {_cell(p['likelihood_accuracy'], '.3f')} | "
            + " | ".join(ys)
            + " |"
        )
    lines += [
        "",
        "| seed | SFT floor acc. / perplexity | top-1 student acc. / perplexity |",
        "|---|---|---|",
    ]
    for seed, f in front["floors"].items():
        lines.append(
            f"| {seed} | {f['sft']:.4f} / {f['sft_perplexity']:.0f} | "
            f"{f['top1']:.4f} / {f['top1_perplexity']:.0f} |"
        )
    for reading, name in READINGS.items():
        checks = verdicts(front, reading)
        if not checks:
            continue
        lines += [
            "",
            "Is a cmiguard point above every baseline curve (at its own users' accuracy)? "
            f"y read as {name}:",
            "",
            "| point | scale | x | y | baseline curves' y at x | dominated by | above all |",
            "|---|---|---|---|---|---|---|",
        ]
        for c in checks:
            at = ", ".join(f"{f} {_cell(v)}" for f, v in c["curves"].items())
            by = ", ".join(c["dominated_by"]) or "—"
            above = "yes" if c["above_every_baseline"] else "no"
            lines.append(
                f"| {c['defense']} | {SCALE_NAMES[c['scale']]} | {c['x']:.3f} | "
                f"{_cell(c['y'])} | {at} | {by} | {above} |"
            )
    return "\n".join(lines)


def write_frontier(front: dict, out: Path, command: str, seconds: float) -> None:
    """``frontier.{json,md}`` under ``out``: the points, and the table with the
    command and its wall time; and the plane for each reading of y
    (``frontier.png``, ``frontier_best.png``)."""
    from cmiguard.checkpoint import atomic_write

    out.mkdir(parents=True, exist_ok=True)
    data = {
        "command": command,
        "seconds": seconds,
        **front,
        "verdicts": verdicts(front),
        "verdicts_best": verdicts(front, "y_best"),
    }
    atomic_write(
        out / "frontier.json", lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1))
    )
    head = f"```bash\n{command}\n```\n\nWall time so far: {seconds / 3600:.1f} h.\n\n"
    (out / "frontier.md").write_text(head + frontier_table(front) + "\n")
    for reading, name in (("y", "frontier.png"), ("y_best", "frontier_best.png")):
        _plot_plane(front, reading, out / name)


def _plot_plane(front: dict, reading: str, path: Path) -> None:
    """The plane with each family as a curve, one panel per scale, y read as ``reading``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8.5), sharex=True)
    for ax, scale in zip(axes.flat, SCALES, strict=True):
        for family, curve in curves(front).items():
            if family == "cmiguard":
                lines, style = _cmiguard_runs(curve), {"marker": "*", "ms": 11}
            else:
                lines, style = [curve], {"marker": "o"}
            _plot_curves(ax, lines, scale, reading, family, style)
        ax.axhline(0, color="k", lw=0.8)
        title = "strongest attack" if reading == "y" else "attacker's best student"
        ax.set_title(f"gap closed, students' {SCALE_NAMES[scale]}, {title}", fontsize=9)
    for ax in axes[1]:
        ax.set_xlabel("honest users' log-likelihood accuracy (held-out capitals)")
    for ax in axes[:, 0]:
        ax.set_ylabel("gap closed (1 = distillation reduced to the floor)")
    if axes[0, 0].get_legend_handles_labels()[0]:  # none while only the raw point is done
        axes[0, 0].legend(fontsize=8)
    fig.suptitle(
        f"y: {READINGS[reading]}; seeds {', '.join(front['seeds'])} (bars: sd over seeds); "
        "better defenses sit up and to the right",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cmiguard_runs(points: list[dict]) -> list[list[dict]]:
    """cmiguard points split into training runs, in the order given: labels
    ``RUN-stepK`` share a run (one line through its steps); any other label
    stands alone, so a line never joins two runs."""
    runs: dict[str, list[dict]] = {}
    for p in points:
        runs.setdefault(p["knob"].rsplit("-step", 1)[0], []).append(p)
    return list(runs.values())


def _plot_curves(
    ax, lines: list[list[dict]], scale: str, reading: str, family: str, style: dict
) -> None:
    """One colour and legend entry per family; each line with its sd bars and knob labels."""
    color = None
    for i, curve in enumerate(lines):
        xs = [p["likelihood_accuracy"] for p in curve]
        ys = [p[reading][scale] for p in curve]
        label = family if i == 0 else None
        color = ax.plot(xs, ys, label=label, color=color, **style)[0].get_color()
        sds = [p[f"{reading}_sd"][scale] for p in curve]  # NaN (no bar) with one seed
        ax.errorbar(xs, ys, yerr=sds, fmt="none", ecolor=color, capsize=3, lw=0.8)
        for p, x, y in zip(curve, xs, ys, strict=True):
            if p["knob"] is not None:
                text = p["knob"] if family == "cmiguard" else f"{p['knob']:g}"
                ax.annotate(text, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")


def run_frontier(
    teacher: nn.Module,
    transforms: Mapping[str, LogitTransform],
    calibration: Sequence[Example],
    heldout: Sequence[Example],
    pad: int,
    config: EvalConfig,
    seeds: Sequence[int],
    defenses: Sequence[str],
    out: Path,
    choices: Sequence[ChoiceQuestion],
    command: str,
    attacks: Sequence[str] = FRONTIER_ATTACKS,
) -> dict:
    """Evaluate every defense against ``attacks``, seed after seed, into
    ``out/seed<S>/`` (each an :func:`evaluate` run, so a rerun resumes where
    the last stopped and may add points, attacks or seeds), and rewrite
    ``out/frontier.*`` after each seed (:func:`report_frontier`)."""
    front: dict = {}
    for seed in seeds:
        cfg = replace(config, seed=seed, attacks=tuple(attacks), defenses=("no_defense", *defenses))
        evaluate(teacher, transforms, calibration, heldout, pad, cfg, out / f"seed{seed}", choices)
        front = report_frontier(out, seeds, command, attacks=attacks)
    return front


def report_frontier(
    out: Path,
    seeds: Sequence[int],
    command: str,
    dest: Path | None = None,
    attacks: Sequence[str] = FRONTIER_ATTACKS,
) -> dict:
    """Rewrite ``frontier.*`` in ``dest`` (default ``out``) from the students of
    every seed in ``seeds`` run so far (a stopped seed's finished columns
    included), a point only where it has every one of ``attacks`` on every
    seed; a ``dest`` keeps a subset's frontier, e.g. one seed's, apart."""
    paths = [out / f"seed{s}" / "evaluation.json" for s in seeds]
    runs = [json.loads(p.read_text()) for p in paths if p.exists()]
    front = frontier(runs, attacks)
    write_frontier(front, dest or out, command, sum(r["seconds"] for r in runs))
    return front
