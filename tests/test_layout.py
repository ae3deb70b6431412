"""The house rules of the package layout, read from the source (imports only, nothing runs)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "adl"
# what each package may import besides itself (adl, adl.errors and the CLI are shared ground)
ALLOWED = {"cache": set(), "extract": {"cache"}, "train": {"cache"}, "sweep": {"cache", "train"},
           "serve": {"cache", "extract", "train"}, "peers": {"cache", "extract", "train"}}


def _imports() -> dict[str, set[str]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts).removesuffix(".__init__")
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("adl"):
                found.add(node.module)
            elif isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.startswith("adl")}
        out[name] = found
    return out


def test_packages_import_only_downwards():
    wrong = []
    for module, imports in _imports().items():
        here = module.split(".")[1] if "." in module else None
        for target in imports:
            there = target.split(".")[1] if "." in target else None
            if here in ALLOWED and there in ALLOWED and there != here and there not in ALLOWED[here]:
                wrong.append(f"{module} imports {target}")
    assert not wrong, wrong


def test_no_import_cycles_between_files():
    imports = _imports()
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
