"""The package's layering (docs/architecture.md): no import cycle, inference does not reach the
collection or fitting modules, and functions stay short enough to read."""

from __future__ import annotations

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / "ocdwrap"


def _module_name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """ocdwrap module -> the ocdwrap modules it imports (package __init__ files left out)."""
    paths = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in paths}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                found = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                found = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {f for f in found if f in paths and f != name}
    packages = {_module_name(p) for p in PACKAGE.rglob("__init__.py")}
    return {m: deps - packages for m, deps in graph.items() if m not in packages}


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_graph_is_read() -> None:  # the checks below would pass vacuously on an empty graph
    graph = _imports()
    assert "ocdwrap.deltas" in graph["ocdwrap.layer"]
    assert "ocdwrap.store" in graph["ocdwrap.collect"]


def test_no_import_cycle() -> None:
    graph = _imports()
    cycles = [m for m in graph if m in _reachable(graph, m)]
    assert not cycles, f"modules on an import cycle: {sorted(cycles)}"


def test_inference_does_not_reach_collection_or_fitting() -> None:
    reached = _reachable(_imports(), "ocdwrap.model")
    # (select.py is reached: wrap(layer="auto") chooses the layer with it)
    pipeline = {"collect", "store", "fit", "overfit", "distributed", "evaluation"}
    assert not reached & {f"ocdwrap.{m}" for m in pipeline}, sorted(reached)


def test_bottom_modules_import_nothing_above_them() -> None:
    graph = _imports()
    assert graph["ocdwrap.deltas"] == set()
    assert graph["ocdwrap.errors"] == set()
    assert graph["ocdwrap.io"] <= {"ocdwrap.errors"}


def test_functions_are_short() -> None:
    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                body = node.body
                doc = isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                start = body[1].lineno if doc and len(body) > 1 else body[0].lineno
                if node.end_lineno - start + 1 > 85:
                    long.append(f"{path.name}:{node.lineno} {node.name}")
    assert not long, f"functions over 85 lines (without the docstring): {long}"
