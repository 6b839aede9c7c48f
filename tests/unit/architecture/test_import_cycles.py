"""No import cycles among the project's modules.

Every import counts: top level, inside functions, and under ``if TYPE_CHECKING:`` (a cycle
the type checker needs is still two modules that cannot be understood apart). Where a module
needs a few attributes of another that depends on it, it declares a ``typing.Protocol``
(``cyphonic_testbed.host.Host``, ``cyphonic_trs.control.RelayingService``).
"""

from __future__ import annotations

from project_scan import Module, all_modules, imports_of


def import_graph(modules: list[Module]) -> dict[str, dict[str, int]]:
    """``module -> {imported project module: line}``."""
    known = frozenset(m.name for m in modules)
    graph: dict[str, dict[str, int]] = {}
    for module in modules:
        edges = graph.setdefault(module.name, {})
        for imp in imports_of(module, known):
            target = imp.target
            while target and target not in known:  # ``pkg.mod.attr`` -> ``pkg.mod``
                target = target.rpartition(".")[0]
            if target and target != module.name:
                edges.setdefault(target, imp.line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(graph.get(child, {}))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                parent = work[-1][0]
                low[parent] = min(low[parent], low[node])
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
    return found


def test_the_detector_finds_a_cycle() -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b": 1}, "b": {}}) == []


def test_no_import_cycles_among_project_modules() -> None:
    modules = all_modules()
    assert len(modules) > 80, "the module scan found too little; is ROOT right?"
    graph = import_graph(modules)
    found = cycles(graph)
    described = [
        f"  {m} imports {n} (line {line})"
        for component in found
        for m in component
        for n, line in graph[m].items()
        if n in component
    ]
    assert not found, "import cycles:\n" + "\n".join(described)
