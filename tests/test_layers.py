"""The package's layers import one way and its modules form no import circle.

Reads every module of `pdserve` with `ast` (no import runs): module-level, function-level
and TYPE_CHECKING imports all count, since each is a dependency a reader has to follow.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_DIR = Path(__file__).resolve().parent.parent / "pdserve"

# Bottom first. A unit is a subpackage or a top-level module; a module may import its own
# unit and units of lower layers. Units sharing a layer are peers and import neither way.
LAYERS: list[set[str]] = [
    {"pdserve.netaddr"},  # addresses and their formats (stdlib only): every layer's listeners
    {
        "pdserve",
        "pdserve.auth",
        "pdserve.config",
        "pdserve.cors",
        "pdserve.envs",
        "pdserve.procs",
    },  # not PD specific
    {"pdserve.engine"},
    {"pdserve.serving"},
    {"pdserve.disagg", "pdserve.router"},
    # `pdserve up`: supervises router + servers as subprocesses; the router benchmark
    # launches its clusters through it, hence below bench.
    {"pdserve.cluster"},
    {"pdserve.bench"},
    # the command line, and `pdserve serve`, which composes serving with disagg's hooks
    {"pdserve.cli", "pdserve.serve"},
    {"pdserve.__main__"},
]

KNOWN_UPWARD_IMPORTS: set[str] = set()
KNOWN_CIRCLES: set[frozenset[str]] = set()


def module_files(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package (packages by __init__)."""
    root = package_dir.parent
    modules = {}
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(path: Path, module: str, known: set[str]) -> set[str]:
    """The known modules that import statements anywhere in the file name: `from a import b`
    is module `a.b` when that exists, else `a`; `import a.b` is the longest known prefix.
    The implicit import of parent packages is not counted."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                prefixes = [".".join(parts[:n]) for n in range(len(parts), 0, -1)]
                found.update(next(([p] for p in prefixes if p in known), []))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if sub in known else base)
    return (found & known) - {module}


def import_graph(package_dir: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports."""
    files = module_files(package_dir)
    return {module: imported_modules(path, module, set(files)) for module, path in files.items()}


def unit_of(module: str, units: set[str]) -> str | None:
    """The longest unit that is the module or contains it."""
    matches = [u for u in units if module == u or module.startswith(u + ".")]
    return max(matches, key=len, default=None)


def layer_violations(graph: dict[str, set[str]], layers: list[set[str]]) -> list[str]:
    units = set().union(*layers)
    level = {unit: i for i, layer in enumerate(layers) for unit in layer}
    found = []
    for module in sorted(graph):
        unit = unit_of(module, units)
        if unit is None:
            found.append(f"{module} is in no layer: add its unit to LAYERS")
            continue
        for target in sorted(graph[module]):
            target_unit = unit_of(target, units)
            if target_unit is None or target_unit == unit:
                continue
            if level[target_unit] >= level[unit]:
                found.append(f"{module} imports {target}")
    return found


def circles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_no_module_imports_from_a_higher_layer():
    violations = set(layer_violations(import_graph(PACKAGE_DIR), LAYERS))
    new = sorted(violations - KNOWN_UPWARD_IMPORTS)
    assert not new, "imports running up the layers or across peers:\n" + "\n".join(new)
    gone = sorted(KNOWN_UPWARD_IMPORTS - violations)
    assert not gone, f"fixed, remove them from KNOWN_UPWARD_IMPORTS: {gone}"


def test_the_module_import_graph_has_no_circle():
    found = set(circles(import_graph(PACKAGE_DIR)))
    new = [sorted(c) for c in found - KNOWN_CIRCLES]
    assert not new, "import circles: " + "; ".join(" <-> ".join(c) for c in new)
    gone = [sorted(c) for c in KNOWN_CIRCLES - found]
    assert not gone, f"no longer circles, remove them from KNOWN_CIRCLES: {gone}"


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root / "pkg"


@pytest.fixture
def toy_package(tmp_path: Path) -> Path:
    return _write(
        tmp_path,
        {
            "pkg/__init__.py": "",
            "pkg/low/__init__.py": "",
            "pkg/low/a.py": "def f():\n    from pkg.high import b\n",
            "pkg/high/__init__.py": "",
            "pkg/high/b.py": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from pkg.high.c import C\n",
            "pkg/high/c.py": "from pkg.high import b\nfrom . import d\n",
            "pkg/high/d.py": "import pkg.low.a\n",
        },
    )


def test_checker_reports_function_level_imports_up_the_layers(toy_package: Path):
    graph = import_graph(toy_package)
    assert layer_violations(graph, [{"pkg"}, {"pkg.low"}, {"pkg.high"}]) == [
        "pkg.low.a imports pkg.high.b"
    ]


def test_checker_finds_circles_through_type_checking_and_relative_imports(toy_package: Path):
    assert circles(import_graph(toy_package)) == [
        frozenset({"pkg.low.a", "pkg.high.b", "pkg.high.c", "pkg.high.d"})
    ]
