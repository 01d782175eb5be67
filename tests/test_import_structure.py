"""No two modules import each other at run time, in the package or among the benchmark
scripts (an import under ``if TYPE_CHECKING:`` only serves annotations and is not
followed): every import, at module level or inside a function, read from the source."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of the modules ``module``'s code imports at run time."""
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    pending = [tree]
    while pending:
        node = pending.pop()
        if isinstance(node, ast.If) and _is_type_checking(node):
            pending.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            found.add(stem)
            found.update(f"{stem}.{alias.name}" for alias in node.names)  # submodules
        pending.extend(ast.iter_child_nodes(node))
    return found


def _graph(files: dict[str, Path]) -> dict[str, set[str]]:
    graph = {}
    for name, path in files.items():
        imported = _imports(ast.parse(path.read_text()), name, path.name == "__init__.py")
        # a module's own package's __init__ is where names are handed on: not an edge
        graph[name] = {m for m in imported if m in files and not name.startswith(m + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _package_files() -> dict[str, Path]:
    files = {}
    for path in (ROOT / "pml_tcm").rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        files[name] = path
    return files


def test_the_package_has_no_import_circle():
    assert _cycle(_graph(_package_files())) is None


def test_the_benchmark_scripts_have_no_import_circle():
    # (tcm_sweep.py and tcm_sweep_report.py imported each other, inside functions)
    files = {path.stem: path for path in (ROOT / "benchmarks").glob("*.py")}
    assert _cycle(_graph(files)) is None


def test_the_circle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    tree = ast.parse("from . import b\nif TYPE_CHECKING:\n    from .c import C\n")
    assert _imports(tree, "p.a", False) == {"p", "p.b"}
