"""The package's layering, checked from its source: no import circles (counting imports inside
functions), and no module outside an adapter's or head's own file asking which kind it holds."""

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "adapters"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the package modules it imports, at the top or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                for alias in node.names:  # "from . import train" names a module
                    if f"{target}.{alias.name}" in modules:
                        found.add(f"{target}.{alias.name}")
                if target in modules:
                    found.add(target)
        graph[name] = found - {name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles_inside_the_package():
    graph = _imports()
    # the package's __init__ re-exports everything; it is the top, not a layer
    graph = {m: {t for t in ts if t != "adapters"} for m, ts in graph.items() if m != "adapters"}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_kind_switches_outside_the_specs():
    """Adapters and heads carry their behaviour: nothing else dispatches on which kind it holds."""
    allowed = {"registry.py", "adapter_spec.py", "lora.py", "bottleneck.py"}
    switch = re.compile(r"isinstance\([^)]*\b(LoRA|Bottleneck)\b|\.kind\s*(==|!=|in\b)|\bkind\s*==\s*\"")
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if path.name in allowed or path.parent.name == "heads":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if switch.search(line):
                offenders.append(f"{path.relative_to(PACKAGE)}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_every_public_name_is_exported():
    import adapters

    for name in adapters.__all__:
        assert hasattr(adapters, name), name
