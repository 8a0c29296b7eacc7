"""The layout's rules, checked on the source with plain `ast`: who may import whom, and how big a function may be."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("orchestrator", "trainers")
# The modules that talk to MLflow: a trial's run and the run lifecycle (trainers.tracking), the figure
# helper that logs a run's PNGs, and the results layer (runs, registry, production, the report's store).
MLFLOW_MODULES = ("trainers.tracking", "trainers.process.figure_helper", "orchestrator.results.")
MAX_LINES = 60
MAX_PARAMETERS = 6


def _module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def _sources() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(encoding="utf-8"), str(p))
            for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


SOURCES = _sources()


def _imported(tree: ast.Module) -> set[str]:
    """Every module name an import statement names, anywhere in the file (lazy and type-only imports too)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _own_module(name: str) -> str | None:
    """The project module an imported name lives in (a from-import may name a function), else None."""
    while name and name not in SOURCES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports (itself and its own package __init__ excluded)."""
    graph = {}
    for module, tree in SOURCES.items():
        deps = {_own_module(n) for n in _imported(tree)} - {None, module}
        graph[module] = {d for d in deps if not module.startswith(d + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None; depth-first search."""
    state: dict[str, int] = {}      # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (found := visit(module)):
            return found
    return None


def test_no_import_cycle_anywhere_in_the_package():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_reports_a_cycle_through_three_modules():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(graph) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_trainers_never_import_the_orchestrator():
    offenders = sorted(m for m, deps in import_graph().items()
                       if m.startswith("trainers") and any(d.startswith("orchestrator") for d in deps))
    assert not offenders, "trainers importing orchestrator: " + ", ".join(offenders)


def test_only_the_logging_modules_import_mlflow():
    offenders = sorted(m for m, tree in SOURCES.items()
                       if any(n == "mlflow" or n.startswith("mlflow.") for n in _imported(tree))
                       and not (m in MLFLOW_MODULES or m.startswith(MLFLOW_MODULES)))
    assert not offenders, "mlflow imported outside the logging modules: " + ", ".join(offenders)


def _functions():
    for module, tree in SOURCES.items():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield module, node


def test_no_function_is_longer_than_sixty_lines():
    long = [f"{m}.{f.name} ({f.end_lineno - f.lineno + 1} lines)" for m, f in _functions()
            if f.end_lineno - f.lineno + 1 > MAX_LINES]
    assert not long, "too long: " + ", ".join(long)


def test_no_function_takes_more_than_six_parameters():
    def count(f) -> int:
        a = f.args
        return len([x for x in a.posonlyargs + a.args + a.kwonlyargs if x.arg not in ("self", "cls")])

    crowded = [f"{m}.{f.name} ({count(f)} parameters)" for m, f in _functions() if count(f) > MAX_PARAMETERS]
    assert not crowded, "too many parameters: " + ", ".join(crowded)
