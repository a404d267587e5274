"""The package's import graph, measured from the source (ast), not from a running import:
no cycle among shim's modules, and nothing imports the composition root ``shim.app``.

What counts as an import edge: every ``import``/``from ... import`` of a ``shim`` module
anywhere in a module (top level, inside functions, in ``try``), EXCEPT
- imports under ``if TYPE_CHECKING:`` (annotations only, never executed), and
- imports under ``if __name__ == "__main__":`` (the module is then the entry script,
  ``__main__``, not the module others import; ``python -m shim.cli`` hands over to
  shim.app that way).
``shim/__main__.py`` is the ``python -m shim`` entry script and is not a module anyone
imports, so its edge to shim.app is allowed.

"Nothing imports shim.app" is checked with the ``TYPE_CHECKING`` imports counted too: not
even an annotation reaches into the composition root.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SHIM = Path(__file__).resolve().parents[2] / "shim"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SHIM.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _skipped_block(node: ast.If, type_checking: bool) -> bool:
    test = node.test
    if isinstance(test, ast.Name) and test.id == "TYPE_CHECKING":
        return not type_checking
    if isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING":
        return not type_checking
    return (isinstance(test, ast.Compare) and isinstance(test.left, ast.Name)
            and test.left.id == "__name__")


def imports_of(path: Path, known: set[str], type_checking: bool = False) -> set[str]:
    """The shim modules ``path`` imports (see the module docstring for what counts);
    ``type_checking``: count the imports under ``if TYPE_CHECKING:`` too."""
    this = module_name(path)
    package = this if path.name == "__init__.py" else this.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _skipped_block(node, type_checking):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            # `from shim import signals` imports the submodule shim.signals (its package
            # is set up first in any case); `from shim.x import name` imports shim.x.
            submodules = {f"{base}.{alias.name}" for alias in node.names} & known
            found.update(submodules or {base})
            if len(submodules) < len(node.names):
                found.add(base)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known and m != this}


def import_graph(type_checking: bool = False) -> dict[str, set[str]]:
    paths = sorted(SHIM.rglob("*.py"))
    known = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, known, type_checking) for p in paths}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_graph_is_read_from_the_source() -> None:
    """Guard against a parser that sees nothing (the other tests would pass vacuously)."""
    graph = import_graph()
    assert len(graph) > 40
    assert "shim.control" in graph["shim.admin"]
    assert "shim.addons.base" in graph["shim.control"]
    assert "shim.control" in graph["shim.app"]
    assert "shim.app" in graph["shim.__main__"]
    # `python -m shim.cli`'s hand-over to shim.app is not an edge (entry-script block).
    assert "shim.app" not in graph["shim.cli"]
    # Annotation-only imports are seen when asked for.
    assert "shim.proxy" not in graph["shim.rollout.engine"]
    assert "shim.proxy" in import_graph(type_checking=True)["shim.rollout.engine"]


def test_no_import_cycle_among_shim_modules() -> None:
    graph = import_graph()
    graph.pop("shim", None)  # the package itself: every submodule import passes through it
    for imports in graph.values():
        imports.discard("shim")
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_nothing_imports_the_composition_root() -> None:
    importers = sorted(m for m, imports in import_graph(type_checking=True).items()
                       if "shim.app" in imports and m != "shim.__main__")
    assert importers == []


def test_the_control_plane_never_sees_the_app_or_the_proxy() -> None:
    annotated, executed = import_graph(type_checking=True), import_graph()
    for module in ("shim.control", "shim.admin", "shim.settings", "shim.runtime",
                   "shim.web", "shim.status", "shim.rollout.engine"):
        assert "shim.app" not in annotated[module], module
        assert "shim.proxy" not in executed[module], module
    for module in ("shim.control", "shim.admin", "shim.settings", "shim.runtime"):
        assert "shim.proxy" not in annotated[module], module


@pytest.mark.parametrize("graph, cycle", [
    ({"a": {"b"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c", "a"]),
    ({"a": {"b"}, "b": set(), "c": {"a"}}, None),
])
def test_the_cycle_finder_finds_cycles(graph: dict[str, set[str]],
                                       cycle: list[str] | None) -> None:
    assert find_cycle(graph) == cycle
