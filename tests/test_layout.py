"""The layout is the data flow: connectors never import the daemon, and no module of
syncd/ or connectors/ imports, however indirectly, a module that imports it back.
Every import counts, also those inside functions and under ``TYPE_CHECKING``."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("syncd", "connectors")


def _module_names() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (a ``from package import module`` names the module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            # ``from package import module`` names the module (Python loads a module's
            # parent packages first whatever imports it: not an edge of the design).
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base
                       for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:   # ``a.b.func`` -> ``a.b``
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _graph() -> dict[str, set[str]]:
    modules = _module_names()
    return {name: _imports(name, path, set(modules)) for name, path in modules.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}      # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_module_imports_itself_back():
    graph = _graph()
    assert len(graph) > 50 and graph["syncd.daemon"], "the graph was not read"
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_the_cycle_finder_reports_an_added_back_edge():
    graph = _graph()
    graph["syncd.events"] = graph["syncd.events"] | {"syncd.daemon"}   # syncd.daemon reaches syncd.events
    found = _cycle(graph)
    assert found is not None and found[0] == found[-1] and "syncd.daemon" in found


def test_connectors_import_nothing_of_the_daemon():
    graph = _graph()
    reaching = {name: sorted(t for t in targets if t.split(".")[0] == "syncd")
                for name, targets in graph.items() if name.split(".")[0] == "connectors"}
    assert reaching and not any(reaching.values()), {k: v for k, v in reaching.items() if v}
