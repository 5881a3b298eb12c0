"""Every module imports on its own, and the package's modules import each other without cycles."""

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "brecq"
# Modules whose import needs an optional dependency; absent, they are skipped.
OPTIONAL = {"onnx", "onnxruntime", "onnxscript", "matplotlib", "timm", "torchvision"}


def _modules() -> list[str]:
    """Every module of the package but `__main__` (importing it runs the CLI)."""
    names = []
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__main__":
            continue
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


_IMPORT_EACH = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "brecq" or m.startswith("brecq.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is None or exc.name.split(".")[0] not in json.loads(sys.argv[2]):
            failures[name] = traceback.format_exc()
    except Exception:
        failures[name] = traceback.format_exc()
print(json.dumps(failures))
"""


def test_every_module_imports_alone():
    # One fresh interpreter; the package is forgotten before each module, so each import starts
    # from nothing and a cycle that only some import orders survive shows up.
    result = subprocess.run(
        [sys.executable, "-c", _IMPORT_EACH, json.dumps(_modules()), json.dumps(sorted(OPTIONAL))],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert result.returncode == 0, result.stderr
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    assert not failures, "\n".join(f"{name}:\n{trace}" for name, trace in failures.items())


def _imported(module: str, tree: ast.AST, is_package: bool, modules: set[str]) -> set[str]:
    """Modules of the package that `module` imports anywhere (module level or in functions)."""
    package = module if is_package else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PACKAGE)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            # `from .pkg import mod` imports the submodule; `from .pkg import name` takes a
            # name that pkg/__init__.py defines, which is an import of the package itself.
            for alias in node.names:
                submodule = f"{source}.{alias.name}"
                found.add(submodule if submodule in modules else source)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = set(_modules())
    graph = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        is_package = path.name == "__init__.py"
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        name = ".".join(parts[:-1] if is_package else parts)
        imported = _imported(name, ast.parse(path.read_text()), is_package, modules)
        graph[name] = {m for m in imported if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_package_has_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
