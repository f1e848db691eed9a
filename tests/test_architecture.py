"""The house rules of the layout (docs/ARCHITECTURE.md), checked on the source: imports only run down the floors
(utils <- dataset <- module <- cfg <- entry scripts, bench), no import cycle between the project's files, every
package says what it owns, no library file outgrows one idea, and the entry scripts stay thin."""

import ast
from pathlib import Path

import pytest
from conftest import ROOT

FLOORS = {"utils": 0, "dataset": 1, "module": 2, "cfg": 3, "prune": 4, "evaluate": 4, "fintune_full": 4,
          "fintune_lora": 4, "bench": 4}  # fmt: skip
ENTRIES = ("prune.py", "evaluate.py", "fintune_full.py", "fintune_lora.py")
LIBRARY = ("utils", "dataset", "module", "cfg")


def python_files(*tops: str) -> list[Path]:
    files = []
    for top in tops:
        path = ROOT / top
        files += [path] if path.suffix == ".py" else sorted(path.rglob("*.py"))
    return files


def project_imports(path: Path) -> list[str]:
    """Every module of this project that `path` imports (at any depth of the file), as dotted names."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found += [n for n in names if n.split(".")[0] in FLOORS]
    return found


def dotted(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


@pytest.mark.parametrize("path", python_files(*LIBRARY, "bench", *ENTRIES),
                         ids=lambda p: str(p.relative_to(ROOT)))  # fmt: skip
def test_imports_run_down_the_floors(path):
    floor = FLOORS[path.relative_to(ROOT).parts[0].removesuffix(".py")]
    upward = [name for name in project_imports(path) if FLOORS[name.split(".")[0]] > floor]
    assert not upward, f"{path.relative_to(ROOT)} imports a higher floor: {upward}"


def test_no_import_cycle_between_project_files():
    files = {dotted(p): p for p in python_files(*LIBRARY, "bench", *ENTRIES)}
    graph = {name: {n for n in project_imports(path) if n in files and n != name} for name, path in files.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(trail[trail.index(nxt) :] + [node, nxt]))
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [])


def test_every_package_says_what_it_owns():
    packages = [p for p in (ROOT / "module").rglob("*") if p.is_dir() and p.name != "__pycache__"]
    for package in [ROOT / "module", *packages, ROOT / "bench", ROOT / "bench" / "studies", ROOT / "bench" / "speed"]:
        init = package / "__init__.py"
        assert init.is_file(), f"{package.relative_to(ROOT)} has no __init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and len(doc.split()) >= 10, f"{init.relative_to(ROOT)} does not say what the package owns"


def test_library_files_hold_one_idea_and_entry_scripts_stay_thin():
    long = {str(p.relative_to(ROOT)): n for p in python_files("module") if (n := len(p.read_text().splitlines())) > 350}
    assert not long, f"files in module/ over 350 lines (split them by idea): {long}"
    for entry in ENTRIES:
        lines = len((ROOT / entry).read_text().splitlines())
        assert lines <= 150, f"{entry} has {lines} lines; the run belongs in module/"
