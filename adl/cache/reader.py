"""Reading a cache: ``open_cache(path)`` -> ``Cache``, the only way stage two sees data.

    c = open_cache("cache/imdb")
    c.manifest                          # dict, see manifest.py
    c.splits                            # ["train", "validation", "test"]
    c.views                             # ["pooled:mean", "tokens", ...]
    x = c.read("train", "pooled:mean")  # float32 (N, L, H)
    values, offsets = c.read("train", "tokens")
    # values: lazy (total_tokens, L, D); values[a:b] -> float32 ndarray; example i is
    # values[offsets[i]:offsets[i+1]]
    c.labels("train")                   # (N,) int64, or (total_tokens,) aligned tags for NER
    c.ids("train")                      # (N,) source row ids, to join predictions back

Rows come in extraction order (sorted by length for bucketing), the same in every view;
``ids`` maps each row to its row in the original split or file.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np

from adl.cache.location import Location
from adl.cache.manifest import manifest_hash, ordered_splits, read_manifest
from adl.cache.shards import damaged
from adl.cache.verify import shard_problems
from adl.errors import AdlError


class LazyRows:
    """Row-concatenation of per-shard arrays; slicing rows returns float32 numpy."""

    def __init__(self, parts: list):
        self.parts = parts
        self.bounds = np.cumsum([0] + [p.shape[0] for p in parts])
        self.shape = (int(self.bounds[-1]), *parts[0].shape[1:])
        self.dtype = np.dtype(parts[0].dtype)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows) -> np.ndarray:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("LazyRows supports contiguous row slices only: values[a:b]")
        start, stop, _ = rows.indices(self.shape[0])
        out = [
            p[max(start, lo) - lo : min(stop, hi) - lo]
            for p, lo, hi in zip(self.parts, self.bounds[:-1], self.bounds[1:])
            if start < hi and stop > lo
        ]
        if not out:
            return np.zeros((0, *self.shape[1:]), np.float32)
        return np.concatenate(out).astype(np.float32, copy=False)

    def __array__(self, dtype=None, copy=None):
        return self[:].astype(dtype or np.float32, copy=False)


class Cache:
    """A finished cache. Opening it checks every shard's files (``verify.shard_problems``:
    stores, done.json, row counts, every chunk on disk at its size) but reads no data."""

    def __init__(self, root):
        self.root = Location(root)
        self.manifest = read_manifest(self.root)
        self.fmt = self.manifest["format"]
        self._stores = []
        for i in range(self.manifest["num_shards"]):
            store, problems = shard_problems(self.root, self.manifest, i)
            if problems:
                self.close()
                if store is not None:
                    store.close()
                raise damaged(self.root, problems)
            self._stores.append(store)

    # -- what the cache is ---------------------------------------------------------
    @property
    def splits(self) -> list[str]:
        """Split names, train / validation / test first (the manifest's JSON keys are sorted)."""
        return ordered_splits(self.manifest)

    @property
    def views(self) -> list[str]:
        return list(self.manifest["views"])

    @property
    def task(self) -> str:
        return self.manifest["task"]

    @property
    def label_names(self) -> list[str]:
        return list(self.manifest["label_names"])

    @property
    def layers(self) -> list[int]:
        return list(self.manifest["layers"])

    @cached_property
    def hash(self) -> str:
        return manifest_hash(self.manifest)

    def labeled(self, split: str) -> bool:
        return bool(self._split(split)["labeled"])

    # -- data ----------------------------------------------------------------------
    def read(self, split: str, view: str):
        """``"pooled:<pool>"`` -> float32 (N, L, H); ``"tokens"`` -> (LazyRows, offsets)."""
        self._split(split)
        if view not in self.views:
            hint = "--views tokens" if view == "tokens" else f"--views pooled --pool {view.partition(':')[2]}"
            raise AdlError(
                f"{self.root} has no {view!r} view (it has {', '.join(self.views)}): "
                f"re-extract with `adl extract ... {hint}`"
            )
        if view == "tokens":
            return self._rows(split, "tokens"), self.offsets(split)
        return self._rows(split, "pooled_" + view.partition(":")[2])[:]

    def labels(self, split: str) -> np.ndarray:
        """Sequence tasks: (N,) int64 (-1 where unlabeled). Token tasks: (total_tokens,)
        int64 tag ids on the first sub-token of each word, -100 elsewhere."""
        name = "token_labels" if self.task == "token" else "labels"
        return self._concat(split, name).astype(np.int64)

    def ids(self, split: str) -> np.ndarray:
        return self._concat(split, "ids").astype(np.int64)

    def word_ids(self, split: str) -> np.ndarray:
        """(total_tokens,) int32 word index of each token within its example, -1 for specials."""
        return self._concat(split, "word_ids")

    def offsets(self, split: str) -> np.ndarray:
        """(N+1,) int64: example i's tokens are rows offsets[i]:offsets[i+1] of the tokens view."""
        parts = [np.asarray(s.array(f"{split}/offsets")[:], np.int64) for s in self._stores]
        out, base = [np.zeros(1, np.int64)], 0
        for p in parts:
            out.append(p[1:] + base)
            base += int(p[-1])
        return np.concatenate(out)

    def nbytes(self, split: str, view: str) -> int:
        """Bytes stored on disk for one view of one split."""
        name = "tokens" if view == "tokens" else "pooled_" + view.partition(":")[2]
        return sum(s.nbytes(f"{split}/{name}") for s in self._stores)

    def projection(self) -> dict[str, np.ndarray] | None:
        """The per-layer projection applied before storing tokens, or None."""
        if not self.manifest["projection"]:
            return None
        from safetensors.numpy import load

        return load(self.root.read_bytes("projection.safetensors"))

    # -- helpers -------------------------------------------------------------------
    def _split(self, split: str) -> dict:
        if split not in self.manifest["splits"]:
            raise AdlError(f"{self.root} has no split {split!r} (it has {', '.join(self.splits)})")
        return self.manifest["splits"][split]

    def _rows(self, split: str, name: str) -> LazyRows:
        return LazyRows([s.array(f"{split}/{name}") for s in self._stores])

    def _concat(self, split: str, name: str) -> np.ndarray:
        self._split(split)
        if not self._stores[0].has(f"{split}/{name}"):
            raise AdlError(f"{self.root} stores no {name} for split {split!r}")
        return np.concatenate([np.asarray(s.array(f"{split}/{name}")[:]) for s in self._stores])

    def close(self) -> None:
        for s in self._stores:
            s.close()
        self._stores = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self) -> str:
        sizes = ", ".join(f"{k}={v['n']}" for k, v in self.manifest["splits"].items())
        return f"Cache({str(self.root)!r}, model={self.manifest['model']['id']!r}, views={self.views}, {sizes})"


def open_cache(path) -> Cache:
    """Open a finished cache, a folder or a URL, for reading (raises AdlError if it is incomplete
    or newer, or when its store cannot be reached)."""
    return Cache(path)
