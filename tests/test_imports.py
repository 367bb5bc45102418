"""ssl_sec's modules import each other without a circle: the layers are data, config <-
losses, terms, models, methods, evaluation library <- recipe <- engine, evaluation commands,
cli. The walk counts every import the interpreter runs (at module level or inside a
function), not those under `if TYPE_CHECKING:`, which are for annotations only."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ssl_sec"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(path: Path, modules: set[str]) -> set[str]:
    """The ssl_sec modules `path` imports when it runs."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found: set[str] = set()

    def resolve(base: str | None, level: int) -> str:
        if level == 0:
            return base or ""
        anchor = package.split(".")
        anchor = anchor[: len(anchor) - (level - 1)]
        return ".".join(anchor + ([base] if base else []))

    def add(target: str) -> None:
        # The module itself, or the package whose attribute is imported.
        while target and target not in modules:
            target = target.rsplit(".", 1)[0] if "." in target else ""
        if target and target != name:
            found.add(target)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.startswith("ssl_sec"):
                        add(alias.name)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child.module, child.level)
                if base.startswith("ssl_sec"):
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        add(sub if sub in modules else base)
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def _graph() -> dict[str, set[str]]:
    files = sorted(PACKAGE.rglob("*.py"))
    modules = {_module_name(f) for f in files}
    graph = {_module_name(f): _imports(f, modules) for f in files}
    # Importing a submodule first runs its package's __init__.
    for mod in list(graph):
        parent = mod.rsplit(".", 1)[0]
        if "." in mod and parent in graph and parent != "ssl_sec":
            graph[mod].add(parent)
    return graph


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module, except a package with its
    own submodules: a package's __init__ importing them, and each of them needing the
    package started, is how Python packages work. A circle that leaves the package (the
    package imports X, X imports a module of the package) is kept."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            root = min(component, key=len)
            if len(component) > 1 and not all(m == root or m.startswith(root + ".")
                                               for m in component):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return found


def test_the_walk_sees_imports_of_every_kind():
    graph = _graph()
    assert "ssl_sec.config" in graph["ssl_sec.recipe"]          # from .config import ...
    assert "ssl_sec.methods" in graph["ssl_sec.recipe"]
    assert "ssl_sec.recipe" in graph["ssl_sec.engine"]
    assert "ssl_sec.engine" in graph["ssl_sec.cli"]              # imported inside main()
    assert "ssl_sec.recipe" not in graph["ssl_sec.methods.base"]  # TYPE_CHECKING only


def test_no_import_cycles():
    circles = _circles(_graph())
    assert not circles, "modules that import each other: " + "; ".join(map(str, circles))


def test_the_walk_finds_a_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "p": {"p.x"}, "p.x": {"p"}}
    assert _circles(graph) == [["a", "b", "c"]]


def test_the_schema_core_imports_no_registry():
    graph = _graph()
    for low in ("ssl_sec.config", "ssl_sec.losses", "ssl_sec.terms", "ssl_sec.models",
                "ssl_sec.methods", "ssl_sec.evaluation.knn", "ssl_sec.evaluation.features"):
        assert "ssl_sec.recipe" not in graph[low], low
