"""The engine's import graph (issue 14): no import cycle among engine/ and kernels/ modules, counting imports
inside functions too (images <-> image_dali and convert <-> mcore_io were two), and no underscore-named (private)
name imported from another of our modules (engine/, kernels/, tools/). Private names of third-party libraries
(torch's DCP internals) are outside this rule."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for path in (REPO / pkg).rglob("*.py"):
            parts = path.relative_to(REPO).with_suffix("").parts
            mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return mods


def _imported_modules(path: Path, name: str, mods: dict[str, Path]) -> set[str]:
    """Our modules `path` imports anywhere in it. `from pkg import sub` counts as importing the submodule only
    (the package is already being imported when a submodule asks for its sibling)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module in mods and node.level == 0:
            subs = [f"{node.module}.{a.name}" for a in node.names]
            if all(s in mods or s.endswith("_native") for s in subs):  # _native: the compiled packer
                out.update(s for s in subs if s in mods)
            else:
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name in mods)
    out.discard(name)
    return out


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imported_modules(path, name, mods) for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done

    def visit(node: str, stack: list[str]) -> list[str] | None:
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
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_engine_and_kernels():
    graph = import_graph()
    assert "engine.checkpoint.mcore_io" in graph["engine.checkpoint.convert"]  # the graph is really read
    assert "engine.data.image_dali" in graph["engine.data.images"]
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_no_private_name_is_imported_from_another_of_our_modules():
    mods = _modules()
    found = []
    for path in [*mods.values(), *(REPO / "tools").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                for alias in node.names:
                    private = alias.name.startswith("_") and not alias.name.startswith("__")
                    if private and f"{node.module}.{alias.name}" not in mods and not alias.name.endswith("_native"):
                        found.append(f"{path.relative_to(REPO)}:{node.lineno}: from {node.module} import {alias.name}")
    assert not found, "private names imported across modules (give them a public name):\n" + "\n".join(found)
