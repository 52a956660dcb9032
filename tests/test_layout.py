"""The package's arrows point one way: every module belongs to one of the README's layers and imports only from
its own layer or the layers below, and no module imports one that imports it back, directly or around a circle,
whether at the top of a file or inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

import swav_scale

PACKAGE = Path(swav_scale.__file__).parent


def _imports() -> dict[str, set[str]]:
    """module -> the swav_scale modules it imports anywhere in its file."""
    graph: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("swav_scale"):
                # `from swav_scale import distributed` imports the submodule
                deps |= {f"{node.module}.{a.name}" for a in node.names} if node.module == "swav_scale" else {node.module}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("swav_scale")}
        graph[name] = {d for d in deps if d != name}
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    circles, done = [], set()

    def visit(node: str, path: list[str]) -> None:
        for dep in sorted(graph.get(node, ())):
            if dep in path:
                circles.append(path[path.index(dep):] + [dep])
            elif dep in graph and dep not in done:
                visit(dep, path + [dep])
        done.add(node)

    for module in sorted(graph):
        visit(module, [module])
    return circles


def test_the_scan_finds_a_circle() -> None:
    assert _circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = _imports()
    assert "swav_scale.train" in graph and "swav_scale.build" in graph["swav_scale.train"]
    assert _circles(graph) == []


# The README's layer map, lowest first: a module (or a package's modules, by prefix) -> its layer. A module in
# no row fails the test, so the map stays complete.
LAYERS: list[tuple[str, list[str]]] = [
    ("base", ["errors", "utils", "config", "distributed", "run_dir"]),
    ("data", ["data"]),
    ("shards", ["shards"]),
    ("parts", ["models", "swav", "queue", "optim", "diagnostics", "engines", "checkpoint"]),
    ("assembly", ["build"]),
    ("runs", ["train", "runlog", "preemption"]),
    ("eval", ["eval"]),
    ("views", ["status", "report", "export", "plan"]),
    ("launching", ["launch"]),
    ("commands", ["cli", "demo"]),
]


def layer_of(module: str) -> int | None:
    """The index in LAYERS of a swav_scale module's layer (the package itself: None)."""
    name = module.removeprefix("swav_scale").removeprefix(".")
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(name == p or name.startswith(p + ".") for p in prefixes):
            return index
    return None


def test_every_module_has_a_layer() -> None:
    assert [m for m in _imports() if m != "swav_scale" and layer_of(m) is None] == []


def _upward(graph: dict[str, set[str]]) -> list[str]:
    """Each import of `graph` that points to a higher layer, said as the test failure says it."""
    upward = []
    for module, deps in sorted(graph.items()):
        mine = layer_of(module)
        for dep in sorted(deps):
            theirs = layer_of(dep)
            if mine is not None and theirs is not None and theirs > mine:
                upward.append(f"{module} -> {dep}: layer {LAYERS[mine][0]} imports layer {LAYERS[theirs][0]} above it")
    return upward


def test_the_layer_check_finds_an_upward_import() -> None:
    graph = {"swav_scale.checkpoint.layout": {"swav_scale.config", "swav_scale.train"}}
    assert _upward(graph) == ["swav_scale.checkpoint.layout -> swav_scale.train: layer parts imports layer runs "
                              "above it"]


def test_no_module_imports_from_a_layer_above_its_own() -> None:
    assert _upward(_imports()) == []


BENCHMARKS = PACKAGE.parent / "benchmarks"
TESTS = PACKAGE.parent / "tests"
SUPPORT = PACKAGE.parent / "swav_testing"


def _imported(folder: Path) -> list[tuple[str, str]]:
    """(file name, module name) of every import in the Python files under `folder`."""
    found = []
    for path in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module] if isinstance(node, ast.ImportFrom) and node.module else
                     [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            found += [(path.name, n) for n in names]
    return found


def test_the_tests_import_no_benchmark() -> None:
    """The benchmarks build on the tests' support (swav_testing: the ranks, the reference implementations),
    never the reverse: a test passes or fails on swav_scale and its references alone."""
    benchmark_modules = {p.stem for p in BENCHMARKS.glob("*.py")} | {"benchlib"}
    assert {"bench_sinkhorn", "gpu_suite", "benchlib"} <= benchmark_modules
    found = [f"{file}: {n}" for folder in (TESTS, SUPPORT) for file, n in _imported(folder)
             if n.split(".")[0] in benchmark_modules]
    assert found == []


def test_the_package_imports_no_test_support_and_the_support_no_test() -> None:
    """swav_scale runs without its tests; swav_testing, which the benchmarks import too, without tests/."""
    test_modules = {p.stem for p in TESTS.rglob("*.py")}
    assert {"helpers", "runs", "conftest"} <= test_modules
    assert [f"{file}: {n}" for file, n in _imported(PACKAGE) if n.split(".")[0] == "swav_testing"] == []
    assert [f"{file}: {n}" for file, n in _imported(SUPPORT) if n.split(".")[0] in test_modules] == []
