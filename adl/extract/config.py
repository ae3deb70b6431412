"""ExtractConfig: everything `adl extract` needs, one frozen dataclass validated on creation.

The CLI maps flags onto it and holds no defaults of its own; the Python API builds it
directly: ``run_extract(ExtractConfig(model="minilm", dataset="tweets", limit=1000))``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

from adl.cache.manifest import ITEMSIZE
from adl.checks import INT_GE0, INT_GE1, Num, check, choice
from adl.devices import check_device
from adl.errors import AdlError

VIEWS = ("pooled", "tokens")
POOLS = ("mean", "cls", "last", "max")
DTYPES = tuple(ITEMSIZE)
FORMATS = ("zarr", "hdf5")
PROJECT_METHODS = ("pca", "random")
_INDEX = r"-?\d+"
_LAYER_ITEM = re.compile(rf"^(?:{_INDEX}|(?:{_INDEX})?:(?:{_INDEX})?(?::(?:{_INDEX})?)?)$")


RULES = {**dict.fromkeys(("batch_size", "batch_tokens", "project", "limit", "num_shards"), INT_GE1),
         "project_sample_tokens": Num(2, integer=True), "max_length": Num(2, integer=True),
         "shard_index": INT_GE0, "seed": INT_GE0}


@dataclass(frozen=True)
class ExtractConfig:
    """One backbone pass over a dataset into a cache folder.

    Strings given for ``views``/``pool`` ("pooled,tokens") become tuples; ``None`` means
    "decide from the model and the data": views = pooled, plus tokens when they fit in
    half the free disk (always tokens for NER); pool = mean for encoder states, last for
    decoder states (causal models see the whole text only at the last token).
    """

    model: str  # hub id, local folder, or alias roberta-large | bart-large | minilm
    dataset: str  # named set, hub id owner/name[:config], or csv:|jsonl:|parquet:|conll:PATH
    out: str | None = None  # cache folder; None: cache/<dataset name>
    views: tuple[str, ...] | None = None  # pooled, tokens
    pool: tuple[str, ...] | None = None  # mean, cls, last, max
    layers: str | None = None  # None: all L hidden states; "0,3,6", "-4:", "::2"
    project: int | None = None  # D: store tokens projected H -> D
    project_method: str = "pca"  # pca (fitted on train tokens) | random (Gaussian, seeded)
    project_sample_tokens: int = 16384  # train tokens the PCA is fitted on
    dtype: str = "float16"  # storage dtype
    format: str = "zarr"  # zarr | hdf5
    batch_size: int = 32  # rows per forward pass, at most
    batch_tokens: int | None = None  # cap on rows x longest row per batch; None: batch_size x 128
    max_length: int | None = None  # None: the model's limit
    device: str = "auto"  # adl.devices.SPELLINGS
    limit: int | None = None  # at most this many examples per split (seeded sample)
    seed: int = 42
    text_column: str | None = None
    label_column: str | None = None
    decoder: bool = False  # encoder-decoder models: store decoder states, not encoder states
    trust_remote_code: bool = False
    num_shards: int | None = None  # None: $WORLD_SIZE (torchrun) or 1
    shard_index: int | None = None  # None: $RANK (torchrun) or 0
    overwrite: bool = False  # wipe a folder holding another configuration
    progress: bool = True  # rich progress bars on stderr

    def __post_init__(self):
        for name in ("views", "pool"):
            object.__setattr__(self, name, _as_tuple(getattr(self, name)))
        if isinstance(self.layers, (list, tuple)):
            object.__setattr__(self, "layers", ",".join(str(int(i)) for i in self.layers))
        if not self.model or not self.dataset:
            raise AdlError("both a model and a dataset are needed: adl extract --model M --dataset D")
        for flag, values, allowed in (("--views", self.views, VIEWS), ("--pool", self.pool, POOLS)):
            for v in values or ():
                choice(flag, v, allowed)
        check_device(self.device)
        choice("--dtype", self.dtype, DTYPES)
        choice("--format", self.format, FORMATS)
        choice("--project-method", self.project_method, PROJECT_METHODS)
        if self.views is not None and self.pool is not None and "pooled" not in self.views:
            raise AdlError("--pool needs the pooled view: add it with --views pooled,tokens, or drop --pool")
        if self.project is not None and self.views is not None and "tokens" not in self.views:
            raise AdlError("--project applies to the tokens view: add it with --views pooled,tokens")
        check(self, RULES)
        if self.num_shards is not None and self.shard_index is not None and self.shard_index >= self.num_shards:
            raise AdlError(f"--shard-index {self.shard_index} must be below --num-shards {self.num_shards}")
        if self.layers is not None:
            check_layer_syntax(self.layers)

    @property
    def token_budget(self) -> int:
        """Padded tokens a batch may hold: rows x its longest row."""
        return self.batch_tokens if self.batch_tokens is not None else self.batch_size * 128

    def to_dict(self) -> dict:
        return asdict(self)


def _as_tuple(value) -> tuple[str, ...] | None:
    if value is None:
        return None
    items = value.split(",") if isinstance(value, str) else list(value)
    items = tuple(dict.fromkeys(str(v).strip() for v in items if str(v).strip()))
    return items or None



def check_layer_syntax(spec: str) -> None:
    items = [s.strip() for s in str(spec).split(",")]
    bad = [s for s in items if not _LAYER_ITEM.match(s)]
    if bad or not items:
        raise AdlError(
            f"--layers {spec!r}: cannot read {', '.join(repr(b) for b in bad) or 'it'}; "
            "use indices and python slices such as 0,3,6 or -4: or ::2"
        )


def layer_indices(spec: str | None, n: int) -> list[int]:
    """Absolute, sorted, unique indices into the L = n hidden states selected by ``spec``.

    ``None`` selects all. Items are indices (``-1`` is the last) or python slices
    (``-4:`` the last four, ``::2`` every other); an index or slice bound outside
    [-n, n] is an error, not silently clamped.
    """
    if spec is None:
        return list(range(n))
    check_layer_syntax(spec)
    valid = f"the model has {n} hidden states: valid indices are 0..{n - 1} (or -{n}..-1)"
    chosen: set[int] = set()
    for item in (s.strip() for s in str(spec).split(",")):
        if ":" not in item:
            i = int(item)
            if not -n <= i < n:
                raise AdlError(f"--layers {spec!r}: layer {i} is out of range; {valid}")
            chosen.add(i % n)
            continue
        parts = [int(p) if p else None for p in item.split(":")]
        if any(p is not None and not -n <= p <= n for p in parts[:2]) or parts[2:3] == [0]:
            raise AdlError(f"--layers {spec!r}: slice {item!r} is out of range; {valid}")
        chosen.update(range(n)[slice(*parts)])
    if not chosen:
        raise AdlError(f"--layers {spec!r} selects no layer; {valid}")
    return sorted(chosen)
