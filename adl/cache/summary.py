"""``adl info PATH``: a finished cache at a glance, from its manifest and its shards' done.json.

No store is opened and no chunk is read (so neither numpy nor zarr is imported): a shard whose
store or record is missing is named, and sizes are those of the chunks each record lists (both
formats store whole, uncompressed chunks). ``adl info --check`` reads and verifies every chunk.
"""

from __future__ import annotations

from math import prod

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from adl.cache.location import Location
from adl.cache.manifest import ITEMSIZE, ordered_splits, read_manifest
from adl.cache.shards import chunk_count, shard_records


def human(n: float) -> str:
    """Bytes in decimal units: 1.5 GB."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def finished(path) -> tuple[Location, dict, list[dict]]:
    """The cache at ``path``: (its location, manifest, every shard's done.json); a missing shard
    store or record is one ``AdlError`` line naming it."""
    root = Location(path)
    manifest = read_manifest(root)
    return root, manifest, shard_records(root, manifest)


def view_shape(m: dict, split: str, view: str) -> tuple[int, ...]:
    """pooled:<pool> -> (N, L, H); tokens -> (total_tokens, L, D), from the manifest."""
    s = m["splits"][split]
    if view == "tokens":
        return (s.get("tokens", 0), len(m["layers"]), m["token_dim"])
    return (s["n"], len(m["layers"]), m["hidden_size"])


def stored_bytes(m: dict, records: list[dict], split: str, view: str) -> int:
    """Bytes of one view of one split in the chunks the shards' records list: per shard
    ceil(rows / chunk_rows) chunks of chunk_rows x (L, H or D) values of the stored dtype."""
    name = "tokens" if view == "tokens" else "pooled_" + view.partition(":")[2]
    row = prod(view_shape(m, split, view)[1:]) * ITEMSIZE[m["dtype"]]
    arrays = [r["arrays"][f"{split}/{name}"] for r in records if f"{split}/{name}" in r["arrays"]]
    return sum(chunk_count(a["rows"], a["chunk_rows"]) * a["chunk_rows"] * row for a in arrays)


def summary(path) -> Group:
    """The cache at ``path`` (a folder or a URL) as a rich table: what it holds and its size."""
    root, m, records = finished(path)
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
        ("shards", f"all {m['num_shards']} finished (their done.json); no chunk was read: --check reads and "
                   "verifies every one"),
        ("projection", "none" if not proj else f"{proj['method']} {m['hidden_size']} -> {proj['dim']} "
                                               f"(after {proj.get('activation')}, seed {proj['seed']})"),
        ("created", f"{m.get('created', '?')} by adl {m.get('adl_version', '?')}, "
                    f"{m.get('extraction_seconds', '?')} s"),
    ]
    for key, value in rows:  # values hold user strings (labels, names, paths): never markup
        about.add_row(f"[bold]{key}[/]", escape(value))
    table = Table(title=escape(str(root)), title_justify="left")
    for col in ("split", "examples", "labeled", "view", "shape", "stored"):
        table.add_column(col, justify="right" if col in ("examples", "stored") else "left")
    total = 0
    for split in ordered_splits(m):
        s = m["splits"][split]
        for i, view in enumerate(m["views"]):
            size = stored_bytes(m, records, split, view)
            total += size
            first = i == 0
            table.add_row(escape(split) if first else "", str(s["n"]) if first else "",
                          ("yes" if s.get("labeled") else "no") if first else "", view,
                          " x ".join(map(str, view_shape(m, split, view))), human(size))
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
