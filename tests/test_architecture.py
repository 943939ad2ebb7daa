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


# ------------------------------------------------------------------ what only one place may decide


def _strings(file: Path) -> list[ast.Constant]:
    """The string literals of ``file`` that are not docstrings (f-strings' literal parts included)."""
    tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            for statement in node.body:
                if isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant):
                    docstrings.add(id(statement.value))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and id(n) not in docstrings]


def _library_files(*, outside: tuple[str, ...]) -> list[Path]:
    return [f for f in sorted(PACKAGE.rglob("*.py"))
            if not any(f.relative_to(PACKAGE).as_posix().startswith(prefix) for prefix in outside)]


def test_no_library_message_names_a_magic() -> None:
    """A message names a command through ``frontend.command`` (a Python or CLI user is told their own
    form); only the magics, the panels and the command table itself spell ``%llm_...``."""
    found = [f"{f.relative_to(PACKAGE.parent)}:{n.lineno}: {n.value[:80]!r}"
             for f in _library_files(outside=("magics/", "widgets/", "frontend.py"))
             for n in _strings(f) if "%llm_" in n.value]
    assert not found, "use nbllm.frontend.command(...) instead of spelling the magic:\n" + "\n".join(found)


# Files outside nbllm/loaders/ that may spell a model file's ending or a marker file in a test of a path,
# and why: they read a format's insides, or are about something else than a model to load.
FORMAT_READERS = {
    "gguf_file.py": "the GGUF reader itself: lists a folder's GGUF files and the parts of a split one",
    "adapters.py": "LoRA adapters' formats (a PEFT folder, a GGUF adapter file), not models",
    "testing.py": "writes the models the tests load",
    "download/select.py": "which files of a hub repository to fetch (GGUF quantization rules), before any is local",
}
# (file, literal) pairs that spell a loader's or a format's name outside nbllm/loaders/ for another meaning.
OTHER_MEANINGS = {
    ("constraints.py", "llama.cpp"): "the kind of server at the other end (its dialect), not a loader",
    ("constraints.py", "openai"): "the kind of server at the other end (its dialect), not a loader",
    ("download/select.py", "transformers"): "the kind of a hub repository's files, before any is local",
    ("download/select.py", "gguf"): "the kind of a hub repository's files, before any is local",
    ("download/transfer.py", "gguf"): "the kind of a hub repository's files, before any is local",
    ("fit/machine.py", "transformers"): "a Python package whose version is reported",
    ("fit/machine.py", "gguf"): "a Python package whose version is reported",
    ("fit/failures.py", "transformers"): "a Python module's pip package",
    ("fit/recommend.py", "transformers"): "a Python package that must be installed",
    ("fit/settings.py", "transformers"): "text-generation-webui's own loader names in config-user.yaml",
    ("fit/settings.py", "llama.cpp"): "text-generation-webui's own loader names in config-user.yaml",
    ("adapters.py", "gguf"): "the GGUF adapter format",
}


def _declarations() -> tuple[tuple[str, ...], tuple[str, ...], set[str]]:
    from nbllm.loaders import loader_classes

    classes = loader_classes()
    endings = tuple(e for cls in classes for e in cls.model_files)
    markers = tuple(m for cls in classes for m in cls.model_markers)
    names = {cls.name for cls in classes} | {fmt for cls in classes for fmt in cls.formats}
    return endings, markers, names


def _decides_format(node: ast.AST, endings: tuple[str, ...], markers: tuple[str, ...]) -> bool:
    """Whether ``node`` tests a path against a model file's ending or a marker file: ``x.suffix == '.gguf'``,
    ``name.endswith('.gguf')``, ``'config.json' in names``, ``(folder / 'config.json').is_file()``."""

    def spells(n: ast.AST) -> bool:
        if isinstance(n, ast.Tuple):
            return any(spells(e) for e in n.elts)
        return isinstance(n, ast.Constant) and isinstance(n.value, str) and (
            n.value.lower().endswith(endings) or n.value in markers)

    if isinstance(node, ast.Compare):
        return any(spells(n) for n in [node.left, *node.comparators])
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        if node.func.attr in ("endswith", "match", "fullmatch", "glob", "rglob"):
            return any(spells(a) for a in node.args)
        target = node.func.value
        if node.func.attr in ("is_file", "exists", "is_dir") and isinstance(target, ast.BinOp):
            return spells(target.right)
    return False


def test_which_format_a_path_is_is_decided_by_the_loaders_only() -> None:
    """Outside nbllm/loaders/ nothing tests a path against ``.gguf`` or ``config.json``: it asks
    ``nbllm.loaders.path_format`` (file_format, folder_format, model_files), which asks the loader classes'
    ``model_files`` and ``model_markers``. A new file format is one loader's declaration."""
    endings, markers, _ = _declarations()
    assert ".gguf" in endings and "config.json" in markers  # the declarations this test reads
    found = []
    for file in _library_files(outside=("loaders/", *FORMAT_READERS)):
        tree = ast.parse(file.read_text(encoding="utf-8"), str(file))
        found += [f"{file.relative_to(PACKAGE.parent)}:{n.lineno}" for n in ast.walk(tree)
                  if _decides_format(n, endings, markers)]
    assert not found, "ask nbllm.loaders (path_format, file_format, model_files) instead:\n" + "\n".join(found)


def test_no_loader_or_format_name_is_spelled_outside_the_loaders() -> None:
    """A loader's name (``llama.cpp``) or a format's (``gguf``) outside nbllm/loaders/ comes from the
    loaders (``LLAMACPP``, ``GGUF_FORMAT``, ``auto_loader(fmt).name``), never a literal: the engine, the
    models folder and the fit estimate ask, they do not know."""
    _, _, names = _declarations()
    assert {"llama.cpp", "transformers", "openai", "gguf"} <= names
    found = []
    for file in _library_files(outside=("loaders/", "testing.py")):
        relative = file.relative_to(PACKAGE).as_posix()
        found += [f"{relative}:{n.lineno}: {n.value!r}" for n in _strings(file)
                  if n.value in names and (relative, n.value) not in OTHER_MEANINGS]
    assert not found, "take the name from nbllm.loaders instead:\n" + "\n".join(found)


def test_the_checks_above_see_what_they_look_for(tmp_path: Path) -> None:
    """The scans find each thing they forbid (a test that cannot fail is a defect)."""
    endings, markers, _ = _declarations()
    for code in ("p.suffix.lower() == '.gguf'", "n.endswith(('.gguf', '.bin'))", "'config.json' in names",
                 "(folder / 'config.json').is_file()"):
        assert any(_decides_format(n, endings, markers) for n in ast.walk(ast.parse(code))), code
    for code in ("(folder / 'config.json').read_text()", "p.suffix == '.txt'", "x == 'auto'"):
        assert not any(_decides_format(n, endings, markers) for n in ast.walk(ast.parse(code))), code
    sample = tmp_path / "m.py"
    sample.write_text('"""Run %llm_load here."""\ndef f():\n    """%llm_x"""\n    raise E("run %llm_models")\n')
    assert [n.value for n in _strings(sample) if "%llm_" in n.value] == ["run %llm_models"]
