"""The backbone's sentence embedding, computed from the last hidden state of the heads' own pass.

A model folder that carries a sentence-transformers configuration (``modules.json``: a
Transformer, then a Pooling module, optionally Normalize) is embedded the way
``SentenceTransformer.encode`` embeds it:

    e = pool(Z_{L-1}, mask)            pool from 1_Pooling/config.json: mean, cls, max or last token
    e = e / ||e||_2                    when the modules end with Normalize

Any other folder (or a configuration with modules adl does not compute, such as Dense
projections or several pooling modes at once) gets the mean of the last hidden state over the
real tokens, unnormalised. ``EmbeddingSpec.source`` says which rule applied.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from adl.extract.pooling import pool

# sentence-transformers' Pooling config keys -> adl's pooling kinds
_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
          "pooling_mode_lasttoken": "last"}


@dataclass(frozen=True)
class EmbeddingSpec:
    pool: str = "mean"
    normalize: bool = False
    source: str = "mean of the last hidden state over the real tokens"


def embedding_spec(model_folder: str) -> EmbeddingSpec:
    """The folder's sentence-transformers pooling and normalisation, else the default mean."""
    root = Path(model_folder)
    try:
        modules = json.loads((root / "modules.json").read_text())
        kinds = [str(m["type"]).rsplit(".", 1)[-1] for m in modules]
        pooling = next(m for m in modules if str(m["type"]).endswith("Pooling"))
        cfg = json.loads((root / pooling["path"] / "config.json").read_text())
    except (OSError, ValueError, KeyError, StopIteration):
        return EmbeddingSpec()
    modes = [kind for key, kind in _MODES.items() if cfg.get(key)]
    mode = cfg.get("pooling_mode")  # newer sentence-transformers write the mode by name
    if isinstance(mode, str) and not modes:
        modes = [{"mean": "mean", "cls": "cls", "max": "max", "lasttoken": "last"}.get(mode, "?")]
    if kinds[:2] != ["Transformer", "Pooling"] or set(kinds[2:]) - {"Normalize"} or len(modes) != 1 or modes[0] == "?":
        return EmbeddingSpec(source=f"mean of the last hidden state (the folder's sentence-transformers modules "
                                    f"{kinds} are not computed by adl)")
    normalize = "Normalize" in kinds
    return EmbeddingSpec(modes[0], normalize, f"sentence-transformers: {modes[0]} pooling"
                                              + (", normalised" if normalize else ""))


def embed(spec: EmbeddingSpec, last: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H) last hidden state, (B, T) mask -> (B, H) float32 embeddings."""
    e = pool(spec.pool, last, mask)
    return F.normalize(e, p=2, dim=-1) if spec.normalize else e
