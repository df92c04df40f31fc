"""engine.checkpoint has no import cycle, counting imports inside functions too (issue 14: convert <-> mcore_io)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[3] / "engine" / "checkpoint"


def _imports(path: Path) -> set[str]:
    """engine.checkpoint modules a file imports, anywhere in it."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "engine.checkpoint":
                out.update(a.name for a in node.names)
            elif node.module.startswith("engine.checkpoint."):
                out.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            out.update(a.name.split(".")[2] for a in node.names if a.name.startswith("engine.checkpoint."))
    return out


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in PKG.glob("*.py") if p.stem != "__init__"} | {"hf_remote_code"}
    return {p.stem: _imports(p) & modules for p in PKG.glob("*.py") if p.stem != "__init__"}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt, stack + [nxt])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_engine_checkpoint_has_no_import_cycle():
    graph = _graph()
    assert "mcore_io" in graph["convert"]  # the graph is read (convert uses mcore_io)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
