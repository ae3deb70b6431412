"""``adl info PATH``: a finished cache at a glance (reads the manifest, never the arrays)."""

from __future__ import annotations

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from adl.cache.reader import Cache


def human(n: float) -> str:
    """Bytes in decimal units: 1.5 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def view_shape(cache: Cache, split: str, view: str) -> tuple[int, ...]:
    """pooled:<pool> -> (N, L, H); tokens -> (total_tokens, L, D), from the manifest."""
    m, s = cache.manifest, cache.manifest["splits"][split]
    if view == "tokens":
        return (s.get("tokens", 0), len(m["layers"]), m["token_dim"])
    return (s["n"], len(m["layers"]), m["hidden_size"])


def summary(cache: Cache) -> Group:
    m = cache.manifest
    model = m["model"]
    about = Table.grid(padding=(0, 2))
    proj = m.get("projection")
    rows = [
        ("model", f"{model.get('name', model['id'])} ({model.get('family', '?')}, {model.get('states', '?')} states)"
                  + (f" @ {model['revision'][:12]}" if model.get("revision") else "")),
        ("task", f"{m['task']}: {len(m['label_names'])} labels ({', '.join(m['label_names'][:8])}"
                 + (", ..." if len(m["label_names"]) > 8 else "") + ")"),
        ("dataset", f"{m['dataset'].get('name', '?')} (fingerprint {str(m['dataset'].get('fingerprint', ''))[:12]})"),
        ("layers", f"{len(m['layers'])}: {_ranges(m['layers'])} of {model.get('num_hidden_states', '?')}"),
        ("storage", f"{m['dtype']}, {m['format']}, {m['num_shards']} shard(s), max_length "
                    f"{m['tokenizer'].get('max_length', '?')}"),
        ("projection", "none" if not proj else f"{proj['method']} {m['hidden_size']} -> {proj['dim']} "
                                               f"(after {proj.get('activation')}, seed {proj['seed']})"),
        ("created", f"{m.get('created', '?')} by adl {m.get('adl_version', '?')}, "
                    f"{m.get('extraction_seconds', '?')} s"),
    ]
    for key, value in rows:  # values hold user strings (labels, names, paths): never markup
        about.add_row(f"[bold]{key}[/]", escape(value))
    table = Table(title=escape(str(cache.root)), title_justify="left")
    for col in ("split", "examples", "labeled", "view", "shape", "on disk"):
        table.add_column(col, justify="right" if col in ("examples", "on disk") else "left")
    total = 0
    canonical = ("train", "validation", "test")
    for split in sorted(cache.splits, key=lambda x: (canonical.index(x) if x in canonical else 3, x)):
        s = m["splits"][split]
        for i, view in enumerate(cache.views):
            size = cache.nbytes(split, view)
            total += size
            first = i == 0
            table.add_row(escape(split) if first else "", str(s["n"]) if first else "",
                          ("yes" if s.get("labeled") else "no") if first else "", view,
                          " x ".join(map(str, view_shape(cache, split, view))), human(size))
    table.add_row("", "", "", "", "[bold]total[/]", f"[bold]{human(total)}[/]")
    return Group(about, table)


def _ranges(layers: list[int]) -> str:
    """[0,1,2,3,6] -> '0-3, 6'."""
    out, start = [], None
    for i, x in enumerate(layers):
        if start is None:
            start = x
        if i + 1 == len(layers) or layers[i + 1] != x + 1:
            out.append(str(start) if start == x else f"{start}-{x}")
            start = None
    return ", ".join(out)
