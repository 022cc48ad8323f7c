"""The package's layout holds: no import cycle between its modules, each
folder imports only what its ``__init__`` docstring says it may, every
module imports, and the CLI starts without SQLAlchemy's ORM or Redis."""

from __future__ import annotations

import ast
import importlib
import pkgutil
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import orchestrator_data

PACKAGE = "orchestrator_data"
ROOT = Path(orchestrator_data.__file__).resolve().parent
# Migrations are alembic scripts loaded by path, not modules of the package.
SKIP = {"migrations"}


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package is its __init__)."""
    found: dict[str, Path] = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in SKIP:
            continue
        parts = [PACKAGE, *rel.with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(name: str, path: Path) -> Iterator[str]:
    """The package's modules that ``name`` imports, anywhere in its body
    (function-level and TYPE_CHECKING imports included). ``from pkg import
    sub`` names the module ``pkg.sub``, as import-linter counts it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            if target.startswith(PACKAGE + ".") and target != name:
                yield target


GRAPH = {name: set(_imports(name, path)) for name, path in MODULES.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycle_in_the_package() -> None:
    assert _cycles(GRAPH) == []


def _folder(name: str) -> str:
    """The top-level part of the package that ``name`` lives in."""
    return name.split(".")[1] if name != PACKAGE else ""


def _folders() -> list[str]:
    return sorted(
        {_folder(n) for n, p in MODULES.items() if n.count(".") == 1 and p.stem == "__init__"}
    )


FOLDERS = _folders()
_MAY_IMPORT = re.compile(r"May import:\s*(.+?)\.\s*(?:\n\n|$)", re.S)


def _allowed(folder: str) -> set[str]:
    doc = ast.get_docstring(ast.parse(MODULES[f"{PACKAGE}.{folder}"].read_text())) or ""
    match = _MAY_IMPORT.search(doc)
    assert match, f"{folder}/__init__.py: its docstring has no 'May import: ...' line"
    text = match[1].strip()
    return set() if text == "nothing" else set(re.findall(r"``(\w+)``", text))


def test_every_folder_is_named_in_the_architecture() -> None:
    # The folders of the README's architecture section, and no stray ones.
    assert set(FOLDERS) == {
        "achievements",
        "audit",
        "cache",
        "capture",
        "coordination",
        "db",
        "embedded",
        "models",
        "queue",
        "repositories",
        "schemas",
    }


@pytest.mark.parametrize("folder", FOLDERS)
def test_a_folder_imports_only_what_its_docstring_allows(folder: str) -> None:
    allowed = _allowed(folder)
    known = {_folder(n) for n in MODULES}
    assert allowed <= known, f"{folder}: 'May import' names unknown parts {allowed - known}"
    wrong = sorted(
        f"{module} -> {target}"
        for module, targets in GRAPH.items()
        if _folder(module) == folder
        for target in targets
        if _folder(target) not in (allowed | {folder})
    )
    assert wrong == [], f"{folder} may import only {sorted(allowed)}"


def test_every_module_imports() -> None:
    names = [
        info.name
        for info in pkgutil.walk_packages(orchestrator_data.__path__, PACKAGE + ".")
        if info.name.split(".")[1] not in SKIP
    ]
    assert set(names) | {PACKAGE} == set(MODULES)
    names.remove(f"{PACKAGE}.__main__")  # runs the CLI
    for name in names:
        importlib.import_module(name)


def _modules_loaded_by(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\nimport sys; print(' '.join(sys.modules))"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    return set(out.stdout.split())


@pytest.mark.parametrize(
    "code",
    [
        "from orchestrator_data.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass",
        "from orchestrator_data.cli import main\n"
        "try:\n    main(['audit', 'prune', '--older-than', 'soon'])\nexcept SystemExit:\n    pass",
        "import orchestrator_data",
    ],
    ids=["--help", "bad-argument", "package"],
)
def test_help_and_argument_errors_need_neither_the_orm_nor_redis(code: str) -> None:
    loaded = _modules_loaded_by(code)
    assert "click" in loaded or code == "import orchestrator_data"
    assert not {"sqlalchemy.orm", "redis", "alembic"} & loaded


def test_the_lazy_package_root_still_exports_everything() -> None:
    loaded = _modules_loaded_by(
        "from orchestrator_data import DataLayer, Settings, UnitOfWork, CacheTTLs\n"
        "import orchestrator_data\n"
        "assert set(orchestrator_data.__all__) <= set(dir(orchestrator_data))\n"
        "for name in orchestrator_data.__all__:\n    getattr(orchestrator_data, name)"
    )
    assert "orchestrator_data.datalayer" in loaded
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        orchestrator_data.Nope  # noqa: B018
