"""The stored projection: a fixed per-layer map H -> D applied to token states before they are
stored, its file (``projection.safetensors``, in the cache and in run folders) and its use.

    stored_i = (gelu(Z_i) - mu_i) @ P_i          Z_i: (n, H), mu_i: (H,), P_i: (H, D)

It acts on gelu(Z_i), not Z_i, so that the head's W_i can be learned on top of it
(docs/method.md: f_i = N(a(Z_i) @ W_i^T) with a = GELU). gelu is the exact (erf) GELU,
torch.nn.functional.gelu's default. The file holds mean (L, H), matrix (L, H, D) and layers
(L,), with method, dim, seed, activation and sample_tokens as metadata; the manifest records
``activation: "gelu"``. How mu_i and P_i are fitted (PCA or random) is extraction's business
(``adl.extract.projection``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

ACTIVATION = "gelu"
FILE = "projection.safetensors"


@dataclass(frozen=True, eq=False)
class Projection:
    method: str
    dim: int
    seed: int
    layers: list[int]  # absolute hidden-state indices, one matrix each
    mean: torch.Tensor  # (L, H) float32
    matrix: torch.Tensor  # (L, H, D) float32
    sample_tokens: int | None  # tokens the PCA saw (None for random)

    def to(self, device) -> Projection:
        return Projection(self.method, self.dim, self.seed, self.layers, self.mean.to(device),
                          self.matrix.to(device), self.sample_tokens)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x (n, L, H) token states of the stored layers -> (n, L, D) float32."""
        return torch.einsum("nlh,lhd->nld", F.gelu(x.float()) - self.mean, self.matrix)

    def apply_layer(self, x: torch.Tensor, j: int) -> torch.Tensor:
        """x (..., H) states of stored layer j (position in ``layers``) -> (..., D) float32: the
        same map as ``apply``, one layer at a time (inference feeds layers as they finish)."""
        return (F.gelu(x.float()) - self.mean[j]) @ self.matrix[j]

    def entry(self) -> dict:
        return {"method": self.method, "dim": self.dim, "seed": self.seed, "activation": ACTIVATION,
                "sample_tokens": self.sample_tokens, "file": FILE}

    def save(self, path: Path) -> None:
        """Atomic (temp file + rename): a kill never leaves half a projection."""
        from safetensors.torch import save_file

        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tensors = {"mean": self.mean.cpu().contiguous(), "matrix": self.matrix.cpu().contiguous(),
                   "layers": torch.tensor(self.layers, dtype=torch.int64)}
        meta = {"method": self.method, "dim": str(self.dim), "seed": str(self.seed), "activation": ACTIVATION,
                "sample_tokens": str(self.sample_tokens or 0)}
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path) -> Projection:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {k: f.get_tensor(k) for k in f.keys()}
        return cls(meta["method"], int(meta["dim"]), int(meta["seed"]), t["layers"].tolist(), t["mean"],
                   t["matrix"], int(meta["sample_tokens"]) or None)
