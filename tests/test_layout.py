"""The house rules of the package layout, read from the source (imports only, nothing runs)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "adl"
# what each package may import besides itself (adl, adl.errors, adl.devices and the CLI are shared ground)
ALLOWED = {"cache": set(), "extract": {"cache"}, "train": {"cache"}, "sweep": {"cache", "train"},
           "serve": {"cache", "extract", "train"}, "peers": {"cache", "extract", "train"}}
ENTRY = {"adl", "adl.cli", "adl.__main__"}  # the public face (adl.attach) and the command line: above every package


def _name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")


def edges(source: str, known: set[str], *, at_import: bool = False) -> set[str]:
    """The adl modules ``source`` imports: ``from adl.extract import models`` is an edge to
    adl.extract.models when that is a module (``known``), else to the package adl.extract. All
    imports, wherever they stand, or with ``at_import`` only those that run when the module is
    imported (not inside a function: a lazy import cannot make an import cycle)."""
    found, todo = set(), list(ast.parse(source).body)
    while todo:
        node = todo.pop()
        if at_import and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        todo.extend(ast.iter_child_nodes(node))
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "adl":
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "adl"}
    return found


def _imports(at_import: bool = False) -> dict[str, set[str]]:
    paths = {_name(p): p for p in ROOT.rglob("*.py")}
    return {name: edges(path.read_text(), set(paths), at_import=at_import) for name, path in paths.items()}


def _package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ALLOWED else None


def test_a_from_import_of_a_module_is_an_edge_to_that_module():
    known = {"adl.extract", "adl.extract.models", "adl.train", "adl.train.heads"}
    src = "from adl.extract import models\nfrom adl.train import heads as h, X\ndef f():\n    import adl.cache\n"
    assert edges(src, known) == {"adl.extract.models", "adl.train.heads", "adl.train", "adl.cache"}
    assert edges(src, known, at_import=True) == {"adl.extract.models", "adl.train.heads", "adl.train"}


def test_packages_import_only_downwards():
    wrong = []
    for module, imports in _imports().items():
        here = _package(module)
        for target in imports:
            there = _package(target)
            if here and there and there != here and there not in ALLOWED[here]:
                wrong.append(f"{module} imports {target}")
            if here is None and module not in ENTRY and there is not None:  # shared ground stays below all
                wrong.append(f"{module} (shared ground) imports {target}")
    assert not wrong, wrong


def test_no_import_cycles_between_files():
    imports = _imports(at_import=True)
    graph = {m: {i for i in imps if i in imports} for m, imps in imports.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for n in graph[m]:
            assert state.get(n) != 1, " -> ".join(path + [n])
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])
