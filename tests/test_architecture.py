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


def _fresh_modules(code: str) -> set[str]:
    """The ocdwrap modules a fresh interpreter has loaded after running ``code``."""
    import json
    import subprocess
    import sys

    out = subprocess.run(
        [
            sys.executable,
            "-c",
            code + "\nimport json, sys\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('ocdwrap'))))",
        ],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


HEAVY = {
    "ocdwrap.collect",
    "ocdwrap.fit",
    "ocdwrap.store",
    "ocdwrap.store_writer",
    "ocdwrap.overfit",
    "ocdwrap.select",
    "ocdwrap.headroom",
    "ocdwrap.distributed",
}


def test_import_and_inference_load_neither_collection_nor_fitting(tmp_path) -> None:
    assert _fresh_modules("import ocdwrap") == {"ocdwrap"}
    # an adapter saved, then loaded and used in a fresh process: the inference path alone
    import torch
    from conftest import make_mlp
    from safetensors.torch import save_file

    import ocdwrap

    base = make_mlp()
    save_file(base.state_dict(), tmp_path / "base.safetensors")
    model = ocdwrap.wrap(base, layer="fc2", config=ocdwrap.OCDConfig(delta="rank1"))
    store = ocdwrap.collect(
        model,
        [(torch.randn(8, 10), torch.randint(0, 3, (8,)))],
        torch.nn.CrossEntropyLoss(reduction="none"),
        tmp_path / "d",
        progress=False,
    )
    ocdwrap.fit(model, store, ocdwrap.FitArgs(steps=2, batch_size=8), progress=False)
    model.save_pretrained(tmp_path / "a")
    code = (
        "import torch, ocdwrap\n"
        "import sys; sys.path.insert(0, 'tests')\n"
        "from conftest import make_mlp\n"
        "base = make_mlp()\n"
        "from safetensors.torch import load_file\n"
        f"base.load_state_dict(load_file({str(tmp_path / 'base.safetensors')!r}))\n"
        f"m = ocdwrap.OCDModel.from_pretrained(base, {str(tmp_path / 'a')!r})\n"
        "with m.sampling(seed=0, num_draws=2):\n"
        "    m(torch.randn(4, 10))\n"
    )
    loaded = _fresh_modules(code)
    assert "ocdwrap.model" in loaded and "ocdwrap.hypernet" in loaded  # it did run
    assert not loaded & HEAVY, sorted(loaded & HEAVY)


def test_functions_named_like_their_modules_stay_functions() -> None:
    import sys

    import ocdwrap
    import ocdwrap.distributed  # noqa: F401  imports the submodule ocdwrap.fit

    for name in ("collect", "fit", "headroom"):
        assert callable(getattr(ocdwrap, name)) and not isinstance(
            getattr(ocdwrap, name), type(sys)
        ), name
    assert isinstance(ocdwrap.errors, type(sys))  # submodules are reachable as attributes
    assert set(ocdwrap.__all__) <= set(dir(ocdwrap))


def test_examples_do_not_import_the_benchmarks() -> None:
    """The examples run on the package and their own examples/data.py, never on benchmarks/."""
    examples = PACKAGE.parent / "examples"
    found = []
    for path in sorted(examples.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            found += [
                f"{path.name}:{node.lineno} {n}" for n in names if n.split(".")[0] == "benchmarks"
            ]
    assert len(list(examples.rglob("*.py"))) > 3  # the check would pass vacuously on no files
    assert not found, found
