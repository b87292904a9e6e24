"""The package's import structure: no module imports itself back through others (at module level or
inside a function), and no module reaches for another module's private (underscore) names."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vlmkit"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def absolute(importer: str, is_package: bool, level: int, target: str | None) -> str:
    """The absolute name of ``from <level dots><target> import ...`` written in ``importer``."""
    if level == 0:
        return target or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[:len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, list[str]]]:
    """(imported vlmkit module, names taken from it) for every import in the module, wherever it stands
    (module level, functions, TYPE_CHECKING blocks)."""
    found = []
    is_package = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names if alias.name.split(".")[0] == "vlmkit"]
        elif isinstance(node, ast.ImportFrom):
            target = absolute(name, is_package, node.level, node.module)
            if target.split(".")[0] != "vlmkit":
                continue
            names = []
            for alias in node.names:
                submodule = f"{target}.{alias.name}"
                if submodule in known:  # ``from . import shapes``: the submodule itself
                    found.append((submodule, []))
                else:
                    names.append(alias.name)
            if names:
                found.append((target, names))
    return found


def import_graph() -> dict[str, set[str]]:
    known = modules()
    graph = {name: set() for name in known}
    for name, path in known.items():
        for target, _ in imports(name, path, known):
            while target not in known and "." in target:
                target = target.rsplit(".", 1)[0]
            if target in known and target != name:
                graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
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
                out.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return out


def test_no_module_imports_itself_back_through_others():
    assert cycles(import_graph()) == []


def test_a_package_and_its_own_modules_are_not_counted_as_a_cycle_only_when_one_way():
    graph = {"a": {"a.b"}, "a.b": set(), "c": {"d"}, "d": {"c"}}
    assert cycles(graph) == [["c", "d"]]


def test_no_module_imports_another_modules_private_names():
    known = modules()
    private = []
    for name, path in known.items():
        for target, names in imports(name, path, known):
            private += [f"{name}: from {target} import {n}" for n in names
                        if n.startswith("_") and not n.startswith("__") and target != name]
    assert private == []
