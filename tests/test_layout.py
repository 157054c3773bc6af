"""The package layering of DESIGN.md (docs/design.md): imports point down the list, nothing imports the CLI, no
circles between modules, not even through imports for type annotations."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fruitlens"
# top to bottom; a package may import those below it (and the top-level modules), never those above
LAYERS = ["cli", "serve", "pipelines", "evaluation", "training", "inference", "labelling", "data", "models"]
TOP = {"config", "errors", "jsonio", "filehash", "rundir", "runtime", "templating", "__init__", "__main__"}


def _nodes(path: Path, type_only: bool = True):
    """Every node of the file; ``type_only=False`` leaves out those under ``if TYPE_CHECKING:``."""
    stack = [ast.parse(path.read_text())]
    while stack:
        node = stack.pop()
        if not type_only and isinstance(node, ast.If) and getattr(node.test, "id", "") == "TYPE_CHECKING":
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imports(path: Path) -> set[str]:
    """The fruitlens sub-packages and top-level modules that ``path`` imports at run time (at any depth of the file;
    the package's ``__init__`` imports its public functions lazily, for annotations only)."""
    out = set()
    for node in _nodes(path, type_only=False):
        names = (
            [node.module]
            if isinstance(node, ast.ImportFrom) and node.module
            else [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else []
        )
        for name in names:
            parts = name.split(".")
            if parts[0] == "fruitlens" and len(parts) > 1:
                out.add(parts[1])
    return out


def test_imports_point_down_the_layers():
    wrong = []
    for path in sorted(SRC.rglob("*.py")):
        rel = path.relative_to(SRC)
        own = rel.parts[0] if len(rel.parts) > 1 else rel.stem
        for target in _imports(path):
            if target == own or (own in TOP and target in TOP):
                continue
            if own in TOP and target in LAYERS and own not in ("__init__", "__main__"):
                wrong.append(f"{rel} imports {target}: top-level modules sit below every package")
            elif own in LAYERS and target in LAYERS and LAYERS.index(target) < LAYERS.index(own):
                wrong.append(f"{rel} imports {target}, which sits above {own}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles_between_modules():
    modules = {".".join(p.relative_to(SRC.parent).with_suffix("").parts): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        deps = set()
        for node in _nodes(path):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fruitlens"):
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    deps.add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names if a.name.startswith("fruitlens")}
        graph[name] = {d.removesuffix(".__init__") for d in deps if d in modules and d != name}
    seen, stack = set(), []

    def visit(n):
        if n in stack:
            raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n) :] + [n]))
        if n in seen:
            return
        stack.append(n)
        for d in graph.get(n, ()):
            visit(d)
        stack.pop()
        seen.add(n)

    for n in sorted(graph):
        visit(n)
