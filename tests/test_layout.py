"""The engine's modules import one way: no import cycle among them, counting imports inside
functions and importlib.import_module("engine.x") too (a lazy import still ties two modules)."""

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parent.parent / "engine"


def import_graph() -> dict[str, set[str]]:
    mods = {p.stem for p in ENGINE.glob("*.py") if p.stem != "__init__"}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m in mods:
        for node in ast.walk(ast.parse((ENGINE / f"{m}.py").read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module == "engine":
                targets = [f"engine.{a.name}" for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module]
            elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module":
                args = node.args
                targets = [args[0].value] if args and isinstance(args[0], ast.Constant) else []
            else:
                continue
            for t in targets:
                parts = t.split(".")
                if parts[0] == "engine" and len(parts) > 1 and parts[1] in mods and parts[1] != m:
                    graph[m].add(parts[1])
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as a path of modules, or None (depth-first search with colours)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        path.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return path[path.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        path.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_engine_modules_import_without_cycles():
    graph = import_graph()
    assert {"trainer", "evaluate", "dream", "report", "collect", "evaluation"} <= set(graph)
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
    # Evaluation and the run-directory readers never reach back into training.
    assert "trainer" not in graph["evaluate"] | graph["dream"] | graph["evaluation"]
