"""Import rules of the package, read from the source with `ast` (imports inside functions count, imports under
`if TYPE_CHECKING:` do not: they never run):

(a) no cycle between modules; a package `__init__` importing its own submodules is the one edge that may point down
    into a package from its own `__init__` (`from llmship.quantize import fp16` in llmship/quantize/__init__.py);
(b) nothing imports llmship.pipeline or llmship.cli, except llmship.cli -> llmship.pipeline (the CLI is the top).

How an import becomes edges: `import a.b` -> a.b; `from a import b` -> a (its `__init__` runs the import) and, when
a.b is a module, a.b too; inside package a's own `__init__`, `from a import b` -> a.b only.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "llmship"



def module_names() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"))


def _imports(tree: ast.AST):
    """Every import statement that can run (function bodies included, TYPE_CHECKING blocks not)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        stack.extend(child for child in ast.iter_child_nodes(node) if not _type_checking_only(child))


def import_graph() -> dict[str, set[str]]:
    modules = module_names()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:  # relative: from the importer's package, up level - 1
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in modules:
                    targets.add(submodule)
                    if base == name and is_package:
                        continue  # a package's __init__ importing its own submodule
                targets.add(base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(frozenset(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_graph_sees_function_level_imports_and_skips_type_checking_ones():
    graph = import_graph()
    assert "llmship.quantize" in graph["llmship.config"]  # inside the scheme validator
    assert "llmship.pipeline" in graph["llmship.cli"]  # inside the verbs
    assert "llmship.config" not in graph["llmship.quantize.registry"]  # annotations only
    assert {"llmship.quantize.fp16", "llmship.quantize.fp32"} <= graph["llmship.quantize"]
    assert "llmship.quantize" not in graph["llmship.quantize.fp16"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [frozenset("abc")]


def test_no_import_cycle():
    found = [sorted(c) for c in cycles(import_graph())]
    assert not found, f"import cycles: {found}"


def test_only_the_cli_imports_the_pipeline_and_nothing_imports_the_cli():
    graph = import_graph()
    offenders = sorted((source, target) for source, targets in graph.items() for target in targets
                       if target in ("llmship.pipeline", "llmship.cli")
                       and (source, target) != ("llmship.cli", "llmship.pipeline"))
    assert not offenders, offenders
