"""The import graph of sparseforge has no cycles and no module uses another's private names.

Every ``import`` / ``from ... import`` in ``src/sparseforge`` is read with :mod:`ast`, at module level,
inside functions and under ``if TYPE_CHECKING:`` alike (a cycle that only a deferred import hides is
still a tangle). Edges go to the module actually named: ``from sparseforge.io import checkpoint``
is an edge to ``sparseforge.io.checkpoint``; ``from sparseforge.io.checkpoint import load`` to the
same module. A package's ``__init__`` running first is not counted as an edge of its own.

A private name is one starting with ``_`` (dunders excluded). A module may use its own private
names and those of the private modules of its own package (``ops/_define.py`` serves ``ops/``), but
never ``from x import _y`` of another module, ``x._y`` on an imported module, or a private module
of another package.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "sparseforge"


def module_name(path: Path, root: Path = SRC) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def package_of(module: str, is_package: bool) -> str:
    return module if is_package else module.rpartition(".")[0]


def owner_package(module: str) -> str:
    """The package a (possibly private) module belongs to: ``a.b._c`` -> ``a.b``."""
    return module.rpartition(".")[0]


class Imports(ast.NodeVisitor):
    """Edges and private-name uses of one module."""

    def __init__(self, module: str, is_package: bool, modules: set[str]):
        self.module, self.modules = module, modules
        self.package = package_of(module, is_package)
        self.edges: set[str] = set()
        self.private: list[str] = []
        self.aliases: dict[str, str] = {}  # local name -> our module it is bound to

    def absolute(self, node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = self.package.split(".")
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def check_module(self, target: str, line: int) -> None:
        """A private module (``x._y``) may only be imported from inside its own package."""
        parts = target.split(".")
        for i, part in enumerate(parts):
            if is_private(part):
                owner = ".".join(parts[:i])
                if not (self.module == owner or self.module.startswith(owner + ".")):
                    self.private.append(f"{self.module}:{line} imports private module {target}")
                return

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if alias.name.split(".")[0] != PACKAGE:
                continue
            self.edges.add(alias.name)
            self.check_module(alias.name, node.lineno)
            if alias.asname:
                self.aliases[alias.asname] = alias.name

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        source = self.absolute(node)
        if source.split(".")[0] != PACKAGE:
            return
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            if sub in self.modules:  # ``from package import module``
                self.edges.add(sub)
                self.check_module(sub, node.lineno)
                self.aliases[alias.asname or alias.name] = sub
                continue
            self.edges.add(source)
            self.check_module(source, node.lineno)
            if is_private(alias.name) and source != self.module:
                self.private.append(f"{self.module}:{node.lineno} imports {alias.name} from {source}")

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id in self.aliases and is_private(node.attr):
            target = self.aliases[node.value.id]
            if target != self.module and not (
                target == PACKAGE and node.attr in {"_native"}  # kernels.py loads the compiled module
            ):
                self.private.append(f"{self.module}:{node.lineno} uses {target}.{node.attr}")
        self.generic_visit(node)


def scan(root: Path = SRC, package: str = PACKAGE) -> tuple[dict[str, set[str]], list[str]]:
    files = {module_name(p, root): p for p in (root / package).rglob("*.py")}
    modules = set(files)
    graph: dict[str, set[str]] = {}
    private: list[str] = []
    for name, path in sorted(files.items()):
        visitor = Imports(name, path.name == "__init__.py", modules)
        visitor.visit(ast.parse(path.read_text(encoding="utf-8"), filename=str(path)))
        graph[name] = {e for e in visitor.edges if e in modules and e != name}
        private += visitor.private
    return graph, private


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path ``[a, b, ..., a]``, or None (iterative depth-first search)."""
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    for start in sorted(graph):
        if state.get(start):
            continue
        stack = [(start, iter(sorted(graph[start])))]
        path = [start]
        state[start] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                state[node] = 2
                stack.pop()
                path.pop()
            elif state.get(child) == 1:
                return path[path.index(child):] + [child]
            elif not state.get(child):
                state[child] = 1
                path.append(child)
                stack.append((child, iter(sorted(graph.get(child, ())))))
    return None


def test_sparseforge_has_no_import_cycle():
    graph, _ = scan()
    assert len(graph) > 40, "the scan found too few modules; is SRC right?"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_module_uses_another_modules_private_names():
    _, private = scan()
    assert not private, "private names used across modules:\n" + "\n".join(private)


def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / PACKAGE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_scan_sees_a_cycle_through_a_deferred_import(tmp_path):
    root = write_package(tmp_path, {
        "__init__.py": "",
        "a.py": "from sparseforge.b import f\n",
        "io/__init__.py": "",
        "io/c.py": "def g():\n    from sparseforge import a\n",
        "b.py": "def f():\n    from sparseforge.io import c\n",
    })  # fmt: skip
    graph, _ = scan(root)
    assert graph["sparseforge.b"] == {"sparseforge.io.c"}
    assert find_cycle(graph) == ["sparseforge.a", "sparseforge.b", "sparseforge.io.c", "sparseforge.a"]


@pytest.mark.parametrize(
    "code",
    [
        "from sparseforge.b import _helper\n",
        "from sparseforge import b\nb._helper()\n",
        "def f():\n    from sparseforge import b as bb\n    return bb._helper\n",
        "from sparseforge.sub._hidden import x\n",
    ],
)
def test_the_scan_sees_a_private_name(tmp_path, code):
    root = write_package(tmp_path, {
        "__init__.py": "", "a.py": code, "b.py": "def _helper(): pass\n",
        "sub/__init__.py": "", "sub/_hidden.py": "x = 1\n",
    })  # fmt: skip
    _, private = scan(root)
    assert len(private) == 1 and private[0].startswith("sparseforge.a:")


def test_a_package_may_use_its_own_private_modules(tmp_path):
    root = write_package(tmp_path, {
        "__init__.py": "", "sub/__init__.py": "from sparseforge.sub._hidden import x\n",
        "sub/_hidden.py": "x = 1\n", "sub/user.py": "from sparseforge.sub._hidden import x\n",
    })  # fmt: skip
    graph, private = scan(root)
    assert private == [] and find_cycle(graph) is None


def package_graph(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Edges between the top-level parts of sparseforge (``io``, ``formats``, ``cli``, ...): a folder
    depends on another when any module in it imports one there. ``sparseforge/__init__`` (lazy public
    names) is left out: every part may be reached through it."""
    def part(module: str) -> str:
        return module.split(".")[1] if "." in module else ""

    out: dict[str, set[str]] = {}
    for a, bs in graph.items():
        if part(a):
            out.setdefault(part(a), set()).update(part(b) for b in bs if part(b) and part(b) != part(a))
    return out


def test_the_folders_import_one_way():
    """No two top-level parts import each other, even through a chain: the layout has one direction."""
    graph, _ = scan()
    packages = package_graph(graph)
    assert {"io", "formats", "ops", "nn", "prune", "runtime", "train", "moe"} <= set(packages)
    cycle = find_cycle(packages)
    assert cycle is None, "folders that import each other: " + " -> ".join(cycle)


def test_the_folder_check_sees_a_two_way_dependency():
    graph = {"sparseforge.io.a": {"sparseforge.runtime.b"}, "sparseforge.runtime.b": set(),
             "sparseforge.runtime.c": {"sparseforge.io.d"}, "sparseforge.io.d": set()}
    assert find_cycle(package_graph(graph)) == ["io", "runtime", "io"]
