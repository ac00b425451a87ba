"""The package's layout holds: imports point one way, and the docs' links resolve."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# cmiguard.<sub> for each concern; everything else directly under engine/ is the core
CONCERNS = ("train", "attack", "serve")
# what each part may import from cmiguard (besides the core and the kernels)
ALLOWED = {
    "core": set(),
    "kernels": set(),
    "train": {"train"},
    "attack": {"train", "attack"},
    "serve": {"train", "serve"},
}
# the public facade and the command line (engine/cli/) sit above every concern
FACADE = "engine/__init__.py"


def part_of(path: Path) -> str:
    rel = path.relative_to(ROOT)
    if rel.parts[0] == "ops":
        return "kernels"
    return rel.parts[1] if len(rel.parts) > 2 and rel.parts[1] in CONCERNS else "core"


def cmiguard_imports(path: Path) -> set[str]:
    """The ``cmiguard.<part>`` each import in ``path`` reaches (lazy ones included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "cmiguard" and len(parts) > 1:
                found.add(parts[1])
    return found


def modules() -> list[Path]:
    files = sorted((ROOT / "engine").rglob("*.py")) + sorted((ROOT / "ops").rglob("*.py"))
    return [
        f
        for f in files
        if str(f.relative_to(ROOT)) != FACADE and f.relative_to(ROOT).parts[1] != "cli"
    ]


def test_the_layout_has_its_rooms():
    for concern in CONCERNS:
        assert (ROOT / "engine" / concern / "__init__.py").is_file()
    # the command line: a module per command, each registering its own options
    from cmiguard.cli import COMMANDS, build_parser

    names = {m.__name__.rsplit(".", 1)[1] for m in COMMANDS}
    assert names == {"train", "purify", "fold", "serve", "evaluate", "demo"}
    assert all(callable(m.register) for m in COMMANDS)
    commands = build_parser()._subparsers._group_actions[0].choices
    assert list(commands) == [
        "train", "purify", "fold", "export-teacher", "serve", "evaluate", "demo"
    ]  # fmt: skip
    assert len(modules()) >= 30


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_one_way(path: Path):
    part = part_of(path)
    reached = {name for name in cmiguard_imports(path) if name in CONCERNS}
    forbidden = reached - ALLOWED[part]
    assert not forbidden, f"{path.relative_to(ROOT)} ({part}) imports cmiguard.{forbidden}"
    if part == "kernels":
        assert cmiguard_imports(path) <= {"kernels"}, "the kernels import nothing of the engine"


def test_no_top_level_folder_shadows_an_installed_module():
    """The repository root is on ``sys.path`` under pytest and ``python -c``:
    a folder there named like an installed distribution's module hides it
    (``kernels/`` hid PyPI's ``kernels``, which transformers imports)."""
    installed = set(importlib.metadata.packages_distributions())
    assert {"torch", "transformers"} <= installed  # the check sees what is installed
    folders = {p.name for p in ROOT.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert "ops" in folders and "engine" in folders
    assert not folders & installed, f"top-level folders shadow {sorted(folders & installed)}"


def test_the_rule_catches_a_core_module_importing_serve(tmp_path):
    """The check itself sees a lazy import of serve from a core module."""
    bad = tmp_path / "probe.py"
    bad.write_text("def f():\n    from cmiguard.serve.server import create_app\n")
    assert cmiguard_imports(bad) == {"serve"}
    assert part_of(ROOT / "engine" / "probe.py") == "core"
    assert part_of(ROOT / "engine" / "serve" / "probe.py") == "serve"
    assert "serve" not in ALLOWED["core"] | ALLOWED["attack"]


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def documents() -> list[Path]:
    return (
        [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
        + sorted((ROOT / "experiments").rglob("*.md"))
        + [ROOT / "bench" / "RESULTS.md"]
    )


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(doc: Path):
    links = [m for m in LINK.findall(doc.read_text(encoding="utf-8")) if "://" not in m]
    missing = [m for m in links if not (doc.parent / m).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing {missing}"
    assert "../shared" not in doc.read_text(encoding="utf-8")


def test_nothing_needs_files_outside_the_repository():
    for path in [*modules(), *(ROOT / "tests").rglob("*.py"), ROOT / "Makefile"]:
        if path.name == "test_layout.py":
            continue
        assert "shared/" not in path.read_text(encoding="utf-8"), path


def scripts() -> list[Path]:
    """Every runnable script outside the package: the studies and the benchmarks."""
    files = sorted((ROOT / "experiments").rglob("*.py")) + sorted((ROOT / "bench").glob("*.py"))
    return [f for f in files if 'if __name__ == "__main__":' in f.read_text(encoding="utf-8")]


@pytest.mark.parametrize("script", scripts(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_script_answers_help_without_running(script: Path):
    # a study that ignored --help ran for up to 9 minutes instead of saying what it does
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith("usage: "), done.stdout[:500]
