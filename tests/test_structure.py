"""The package's architecture, checked from its source: the tree shows the layers, the README's layer
table is the import-linter contract `make lint` enforces, there are no import circles (imports inside
functions counted), and no module outside an adapter's or head's own file asks which kind it holds."""

import ast
import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "adapters"
# isinstance on a kind's class, or a comparison of a kind's name: a switch on which kind a spec is
KIND_SWITCH = re.compile(
    r"isinstance\([^)]*\b(LoRA|Bottleneck)\b|\.kind\s*(==|!=|in\b)|\bkind\s*==\s*\"|\[\"kind\"\]\s*=="
)


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the package modules it imports (absolute or relative), at the top or inside functions."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        tree = ast.parse(path.read_text())
        # imports only for annotations (under `if TYPE_CHECKING:`) never run: they make no circle
        typing_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING"
            for inner in ast.walk(node)
        }
        for node in ast.walk(tree):
            if id(node) in typing_only:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                    target = f"{base}.{node.module}" if node.module else base
                else:
                    target = node.module or ""
                # "from adapters.training import batch_size" names a module
                targets = [target] + [f"{target}.{alias.name}" for alias in node.names]
            found |= {t for t in targets if t in modules}
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


def test_imports_are_read_from_the_source():
    graph = _imports()
    # absolute imports, a package's re-exports and imports inside functions all count
    assert "adapters.artifacts.format" in graph["adapters.model"]
    assert "adapters.training.batch_size" in graph["adapters.training.loop"]
    assert "adapters.memory.estimate" in graph["adapters.cli"]  # imported inside a function


def test_no_import_cycles_inside_the_package():
    graph = _imports()
    # the package's __init__ re-exports everything; it is the top, not a layer. A module's package
    # __init__ is not a layer either (the package itself is).
    graph = {m: {t for t in ts if t != "adapters"} for m, ts in graph.items() if m != "adapters"}
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def _contract_layers() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    (layers,) = [c["layers"] for c in config if c["type"] == "layers"]
    return [name.removeprefix("adapters.") for name in layers]


def test_the_readme_layer_table_is_the_enforced_contract():
    """The README's architecture table lists the layers top to bottom, as the import-linter contract does."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Architecture", 1)[1].split("\n\n", 2)[1]
    layers = re.findall(r"^\| `(?:adapters/)?([a-z_]+)(?:/|\.py)`", table, flags=re.M)
    assert layers == _contract_layers()


def test_every_layer_in_the_contract_exists_and_every_module_is_in_a_layer():
    layers = _contract_layers()
    for layer in layers:
        assert (PACKAGE / layer).is_dir() or (PACKAGE / f"{layer}.py").is_file(), layer
    top_level = {p.stem for p in PACKAGE.glob("*.py")} | {p.name for p in PACKAGE.iterdir() if p.is_dir()}
    outside = top_level - set(layers) - {"__init__", "__main__", "__pycache__"}
    assert not outside, f"modules in no layer of the contract: {sorted(outside)}"


def test_the_top_level_stays_small():
    """Most code lives in the layers' subpackages; the top level holds a handful of modules."""
    modules = [p.name for p in PACKAGE.glob("*.py")]
    assert len(modules) <= 12, modules


def test_no_kind_switches_outside_the_specs():
    """Adapters and heads carry their behaviour: nothing else dispatches on which kind it holds."""
    allowed = {"registry.py", "methods/spec.py", "methods/lora.py", "methods/bottleneck.py"}
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        relative = str(path.relative_to(PACKAGE))
        if relative in allowed or path.parent.name == "heads":
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if KIND_SWITCH.search(line):
                offenders.append(f"{relative}:{number}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_the_kind_switch_finder_finds_one():
    for line in ("if isinstance(spec, LoRA):", "if adapter.kind == 'lora':", 'if spec["kind"] == "lora":'):
        assert KIND_SWITCH.search(line), line
    assert not KIND_SWITCH.search("adapter.switch(model, handle, True)")


def test_every_public_name_is_exported():
    import adapters

    for name in adapters.__all__:
        assert hasattr(adapters, name), name


def test_no_function_in_the_package_is_over_60_lines():
    """A function reads at once: the longest in ``adapters/`` stays within 60 lines (split by responsibility)."""
    import ast

    long = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(PACKAGE)}:{node.name} ({lines} lines)")
    assert not long, long
