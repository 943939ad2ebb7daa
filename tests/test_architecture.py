"""The package's shape: no import cycle between nbllm's modules.

The graph is read from the source with ``ast`` (nothing is imported), counting every import at any depth,
function-level lazy imports included: a lazy import hides a cycle from Python's import system, not from
the design. Imports under ``if TYPE_CHECKING:`` count too: they never run, but a type two modules need
from each other is a cycle in the design all the same (it belongs in a module below both, or a protocol).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nbllm"

# Edges of a cycle that a change under way elsewhere removes, as (importer, imported). result.py reads
# the version with `from . import __version__` (result -> nbllm -> result); `from ._version import
# __version__` ends it. Once it is gone the test below says to empty this set.
PENDING: set[tuple[str, str]] = set()


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted module name → file, for every module of the package (``pkg/__init__.py`` is ``pkg``)."""
    out: dict[str, Path] = {}
    for file in sorted(root.rglob("*.py")):
        parts = list(file.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = file
    return out


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.AST, *, type_checking: bool = True) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement in ``tree``, at any depth; those under ``if TYPE_CHECKING:`` only with
    ``type_checking``."""
    found: list[ast.Import | ast.ImportFrom] = []
    todo: list[ast.AST] = [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        if isinstance(node, ast.If) and _is_type_checking(node.test) and not type_checking:
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return found


def _edges(name: str, file: Path, modules: dict[str, Path], *, type_checking: bool = True) -> set[str]:
    """The package's modules that module ``name`` imports."""
    is_package = file.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in _imports(ast.parse(file.read_text(encoding="utf-8"), str(file)), type_checking=type_checking):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names if alias.name in modules)
            continue
        if node.level:
            base_parts = package.split(".")
            base_parts = base_parts[: len(base_parts) - (node.level - 1)]
            target = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            target = node.module or ""
        for alias in node.names:
            sub = f"{target}.{alias.name}"
            if sub in modules:  # `from . import x` / `from .pkg import sub`: the submodule itself
                out.add(sub)
            elif target in modules:  # a name defined in the module (or the package's __init__)
                out.add(target)
    out.discard(name)
    return out


def import_graph(root: Path = PACKAGE, *, type_checking: bool = True) -> dict[str, set[str]]:
    """Module → the package's modules it imports (with ``type_checking``, under ``if TYPE_CHECKING:`` too)."""
    modules = _modules(root)
    return {name: _edges(name, file, modules, type_checking=type_checking) for name, file in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, ..., a]``), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycle_in_the_package() -> None:
    graph = import_graph()
    assert len(graph) > 20 and "nbllm.models" in graph
    for importer, imported in PENDING:
        assert imported in graph[importer], f"{importer} no longer imports {imported}: remove it from PENDING"
        graph[importer].discard(imported)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_without_type_checking_imports_the_graph_is_what_python_runs(tmp_path: Path) -> None:
    root = tmp_path / "p"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import y\nx = 1\n")
    (root / "b.py").write_text("from .a import x\n")
    assert find_cycle(import_graph(root, type_checking=False)) is None
    assert find_cycle(import_graph(root)) == ["p.a", "p.b", "p.a"]


@pytest.mark.parametrize(
    ("files", "cycle"),
    [
        (  # a lazy import inside a function still counts
            {"__init__.py": "", "a.py": "from .b import f\n", "b.py": "def f():\n    from .a import g\n"},
            ["p.a", "p.b", "p.a"],
        ),
        (  # `from . import x` is an edge to the submodule x, `import p.sub` to it too
            {"__init__.py": "", "a.py": "from . import b\n", "b.py": "import p.a\n"},
            ["p.a", "p.b", "p.a"],
        ),
        (  # a package import is an edge to its __init__, which imports back
            {"__init__.py": "from .a import x\n", "a.py": "x = 1\n", "b.py": "from . import a\n", "sub/__init__.py": ""},
            None,
        ),
        (
            {"__init__.py": "", "a.py": "from .sub import y\n", "sub/__init__.py": "from ..a import z\n"},
            ["p.a", "p.sub", "p.a"],
        ),
        (  # a TYPE_CHECKING import is an edge too; a name from the parent's module is not an edge to __init__
            {
                "__init__.py": "from .a import x\n",
                "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import y\nx = 1\n",
                "b.py": "from .a import x\nfrom .errors import E\n",
                "errors.py": "class E(Exception): ...\n",
            },
            ["p.a", "p.b", "p.a"],
        ),
        (  # under `if typing.TYPE_CHECKING:` and in its else branch alike
            {
                "__init__.py": "",
                "a.py": "import typing\nif typing.TYPE_CHECKING:\n    pass\nelse:\n    from .b import y\n",
                "b.py": "from .a import x\n",
            },
            ["p.a", "p.b", "p.a"],
        ),
    ],
)
def test_the_graph_reader_sees_what_python_runs(tmp_path: Path, files: dict[str, str], cycle: list[str] | None) -> None:
    root = tmp_path / "p"
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    assert find_cycle(import_graph(root)) == cycle
