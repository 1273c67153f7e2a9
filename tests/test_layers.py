"""The layering stays true: imports only go from a higher layer to a lower one, and no module imports itself back
through others (no circles), counting imports inside functions too. docs/architecture.md explains the layers."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
BASE = {"gentool", "gentool.errors", "gentool.console", "gentool.devices", "gentool.config"}
CORE = ("gentool.artifacts", "gentool.codecs", "gentool.data", "gentool.models", "gentool.train",
        "gentool.evaluation")
CLI = ("gentool.cli", "gentool.__main__")


def layer(module: str) -> int:
    if module in BASE:
        return 0
    if module.startswith(CORE):
        return 1
    if module.startswith(CLI):
        return 3
    return 2  # areas: tokenize, lm, diffusion, quantize, adapters, scaling, gguf


def area(module: str) -> str:
    return ".".join(module.split(".")[:2])


def graph() -> dict[str, set[str]]:
    modules = {}
    for f in sorted((SRC / "gentool").rglob("*.py")):
        name = ".".join(f.relative_to(SRC).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = f
    edges = {}
    for name, f in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg import sub` depends on the submodule, `from pkg import name` on the package
                targets = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                           for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            deps |= {t for t in targets if t in modules and t != name}
        edges[name] = deps
    return edges


def test_imports_only_go_down():
    upward = [f"{m} -> {d}" for m, deps in graph().items() for d in deps if layer(d) > layer(m)]
    assert not upward, "imports from a lower layer to a higher one:\n" + "\n".join(sorted(upward))


def test_no_import_circles():
    edges = graph()
    index, low, stack, on_stack, cycles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    assert not cycles, f"import circles: {cycles}"


def test_areas_depend_on_each_other_without_circles():
    areas: dict[str, set[str]] = {}
    for m, deps in graph().items():
        if layer(m) == 2:
            areas.setdefault(area(m), set()).update(area(d) for d in deps if layer(d) == 2 and area(d) != area(m))
    seen, done = set(), set()

    def walk(a, path):
        assert a not in seen or a in done, f"areas import each other in a circle: {' -> '.join(path + [a])}"
        if a in done:
            return
        seen.add(a)
        for b in areas.get(a, ()):
            walk(b, path + [a])
        done.add(a)

    for a in areas:
        walk(a, [])


def test_the_layer_rules_see_every_module():
    """A guard against the test passing vacuously: the graph has the modules and edges it should."""
    edges = graph()
    assert "gentool.models.checkpoint" in edges["gentool.lm.train"]
    assert "gentool.models.quant" in edges["gentool.models.checkpoint"]
    assert layer("gentool.models.checkpoint") == 1 and layer("gentool.lm.train") == 2 and layer("gentool.cli") == 3
