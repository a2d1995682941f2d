"""The house rules of ``mtnlg/``, checked on its source: packages stacked in floors (an import never runs
up a floor or sideways to another package of the same floor), no import circle between modules, no
module over 400 lines, and every package saying at its top what lives there and what it may import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "mtnlg"
# Lowest first; a package may import its own modules and those of packages on lower floors only.
FLOORS = {
    "util": 0, "config": 1, "model": 2, "data": 3, "parallel": 4, "checkpoint": 5, "train": 6, "generate": 6,
    "serve": 7, "eval": 7, "planner": 7, "cli": 8,
}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every mtnlg module ``path`` imports, at the top, in a function or under TYPE_CHECKING alike."""
    found: set[str] = set()
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base]).strip(".")
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names)  # `from mtnlg.x import module`
    return {name for name in found if name.split(".")[0] == "mtnlg"}


def graph() -> dict[str, set[str]]:
    """Module -> the mtnlg modules it imports (names that are not modules folded into their module)."""
    paths = {module_name(p): p for p in ROOT.rglob("*.py")}
    edges = {}
    for name, path in paths.items():
        targets = set()
        for imported in imports(path):
            while imported not in paths and "." in imported:
                imported = imported.rpartition(".")[0]
            if imported != name:
                targets.add(imported)
        edges[name] = targets
    return edges


def floor(module: str) -> tuple[str, int] | None:
    parts = module.split(".")
    if len(parts) < 2 or parts[1] not in FLOORS:
        return None
    return parts[1], FLOORS[parts[1]]


def layering_errors(edges: dict[str, set[str]]) -> list[str]:
    errors = []
    for source, targets in sorted(edges.items()):
        mine = floor(source)
        if mine is None:
            continue
        for target in sorted(targets):
            theirs = floor(target)
            if theirs is None:
                if target != "mtnlg":
                    errors.append(f"{source} imports {target}, which is in no package")
                continue
            if theirs[0] != mine[0] and theirs[1] >= mine[1]:
                errors.append(f"{source} (floor {mine[1]}, {mine[0]}) imports {target} "
                              f"(floor {theirs[1]}, {theirs[0]})")
    return errors


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_is_in_a_package_of_the_table() -> None:
    loose = [module_name(p) for p in ROOT.glob("*.py") if p.name not in ("__init__.py", "__main__.py")]
    assert not loose, f"modules outside a package: {loose}"
    assert {p.name for p in ROOT.iterdir() if p.is_dir() and (p / "__init__.py").is_file()} == set(FLOORS)


def test_no_import_runs_up_a_floor_or_sideways() -> None:
    assert layering_errors(graph()) == []


def test_no_import_circle() -> None:
    assert circles(graph()) == []


def test_no_module_is_over_the_line_limit() -> None:
    lines = {module_name(p): len(p.read_text(encoding="utf-8").splitlines()) for p in ROOT.rglob("*.py")}
    long = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


@pytest.mark.parametrize("package", sorted(FLOORS))
def test_each_package_says_what_it_holds_and_may_import(package: str) -> None:
    doc = ast.get_docstring(ast.parse((ROOT / package / "__init__.py").read_text(encoding="utf-8"))) or ""
    assert "May import:" in doc, f"mtnlg/{package}/__init__.py: its docstring must end with 'May import: ...'"
    allowed = {name for name, level in FLOORS.items() if level < FLOORS[package]}
    named = {word.strip(".,`;()").removeprefix("mtnlg.") for word in doc.split("May import:", 1)[1].split()}
    assert named & set(FLOORS) <= allowed, f"mtnlg/{package}: its docstring allows {named & set(FLOORS) - allowed}"


def test_the_checks_find_what_they_look_for() -> None:
    """A circle and an upward import in a made-up graph are found (the checks can fail)."""
    edges = {"mtnlg.model.a": {"mtnlg.train.b"}, "mtnlg.train.b": {"mtnlg.model.a"}, "mtnlg.util.c": set()}
    assert circles(edges) == [["mtnlg.model.a", "mtnlg.train.b"]]
    assert layering_errors(edges) == ["mtnlg.model.a (floor 2, model) imports mtnlg.train.b (floor 6, train)"]
