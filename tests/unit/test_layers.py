"""The import graph of mcproxy/: layers that follow the data flow, and no cycles.

Every import counts, including the ones under ``if TYPE_CHECKING:`` and inside
functions: a type-only import that closes a cycle still stands for two modules
that know each other. Generated code (``mcproxy/admin/v1``) is left out.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "mcproxy"

MODEL_LAYER = {
    "mcproxy.health",
    "mcproxy.ip",
    "mcproxy.model",
    "mcproxy.settings",
    "mcproxy.status",
    "mcproxy.validation",
    "mcproxy.pipe",
    "mcproxy.limits",
}
"""What both sides of the pipe share; it imports nothing of the processes' own code."""


def _name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _name(path): path
        for path in PACKAGE.rglob("*.py")
        if "v1" not in path.relative_to(PACKAGE).parts
    }


def import_graph() -> dict[str, set[str]]:
    """Module -> the mcproxy modules it imports (anywhere in its body)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = name.split(".")
                    anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                    base = ".".join([*anchor, base] if base else anchor)
                # "from mcproxy import pipe" names a module; "from mcproxy import x" a value
                # of the package (its __init__).
                targets = [
                    f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                    for alias in node.names
                ]
            for target in targets:
                module = target
                while module and module not in modules:
                    module = module.rpartition(".")[0]
                if module.startswith("mcproxy") and module != name:
                    edges.add(module)
        graph[name] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph.get(node, ())):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _packages_only(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Drop edges to a package's ``__init__`` that only stand for "import a submodule"."""
    return {
        name: {t for t in edges if not (name.startswith(t + ".") and t != "mcproxy")}
        for name, edges in graph.items()
    }


def test_the_graph_sees_the_imports() -> None:
    graph = import_graph()
    assert "mcproxy.worker.session" in graph["mcproxy.worker.connection"]
    assert "mcproxy.model" in graph["mcproxy.worker.session"]
    assert "mcproxy.pipe" in graph["mcproxy.supervisor.manager"]  # from mcproxy import pipe


def test_no_import_cycles() -> None:
    assert _cycles(_packages_only(import_graph())) == []


def test_workers_import_neither_the_config_loader_nor_the_supervisor() -> None:
    bad = {
        (name, target)
        for name, edges in import_graph().items()
        if name.startswith("mcproxy.worker")
        for target in edges
        if target == "mcproxy.config" or target.startswith(("mcproxy.supervisor", "mcproxy.admin"))
    }
    assert bad == set()


def test_the_supervisor_does_not_import_the_worker_stack() -> None:
    bad = {
        (name, target)
        for name, edges in import_graph().items()
        if name.startswith("mcproxy.supervisor")
        for target in edges
        if target.startswith("mcproxy.worker") and target != "mcproxy.worker.geoip"
    }
    assert bad == set()  # geoip: the boot check opens the database the workers will use


def test_the_admin_client_does_not_import_the_supervisor() -> None:
    graph = import_graph()
    for name in ("mcproxy.admin.client", "mcproxy.admin.cli", "mcproxy.admin.convert"):
        assert not {t for t in graph[name] if t.startswith("mcproxy.supervisor")}, name


def test_the_model_layer_imports_only_itself() -> None:
    graph = import_graph()
    for name in sorted(MODEL_LAYER):
        assert graph[name] <= MODEL_LAYER, (name, graph[name] - MODEL_LAYER)
