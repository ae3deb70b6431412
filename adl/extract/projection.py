"""A fixed per-layer projection H -> D applied to token states before they are stored.

The head (docs/method.md) computes f_i = N(a(Z_i) @ W_i^T) with a = GELU. A stored projection
must therefore act on a(Z_i), not Z_i, so that W_i can be learned on top of it:

    stored_i = (gelu(Z_i) - mu_i) @ P_i          Z_i: (n, H), mu_i: (H,), P_i: (H, D)

- ``pca``: mu_i and P_i are the mean and the top-D principal directions (columns, unit norm,
  sign fixed so each column's largest-magnitude entry is positive) of gelu(Z_i) over a
  seeded sample of train tokens, taken from one small backbone pass before extraction.
- ``random``: mu_i = 0 and P_i has N(0, 1/D) entries from a seeded generator
  (Johnson-Lindenstrauss: norms and inner products kept in expectation).

gelu is the exact (erf) GELU, torch.nn.functional.gelu's default. The matrices are saved
in the cache as ``projection.safetensors`` (mean (L, H), matrix (L, H, D), layers (L,))
so inference can apply the same map; the manifest records ``activation: "gelu"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from adl.errors import AdlError

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


def check_dim(dim: int, hidden: int) -> None:
    if dim > hidden:
        raise AdlError(f"--project {dim} is wider than the model's hidden size {hidden}: pick D <= {hidden}, e.g. 64")


def random_projection(hidden: int, dim: int, layers: list[int], seed: int) -> Projection:
    g = torch.Generator().manual_seed(seed)
    matrix = torch.randn(len(layers), hidden, dim, generator=g) / dim**0.5
    return Projection("random", dim, seed, list(layers), torch.zeros(len(layers), hidden), matrix, None)


def sample_rows(lengths: np.ndarray, sample_tokens: int, seed: int) -> np.ndarray:
    """Rows of a seeded permutation, taken until they hold >= sample_tokens tokens (sorted)."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    enough = int(np.searchsorted(np.cumsum(lengths[order]), sample_tokens)) + 1
    return np.sort(order[:enough])


class Moments:
    """Running first and second moments of gelu(Z_i) per stored layer, in float64.

    After n tokens: mu = s1 / n, Sigma = (s2 - n mu mu^T) / (n - 1); s2 is (L, H, H).
    """

    def __init__(self, n_layers: int, hidden: int, device):
        self.s1 = torch.zeros(n_layers, hidden, dtype=torch.float64, device=device)
        self.s2 = torch.zeros(n_layers, hidden, hidden, dtype=torch.float64, device=device)
        self.n = 0

    def add(self, j: int, x: torch.Tensor) -> None:
        """x (n, H) real-token states of stored layer j."""
        a = F.gelu(x.float()).double()
        self.s1[j] += a.sum(0)
        self.s2[j] += a.T @ a

    def pca(self, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> mean (L, H), matrix (L, H, D): top-D eigenvectors of each covariance."""
        if self.n < 2:
            raise AdlError("the PCA sample has fewer than 2 tokens: use --project-method random")
        mean = self.s1 / self.n
        cov = (self.s2 - self.n * mean.unsqueeze(2) * mean.unsqueeze(1)) / (self.n - 1)
        _, vectors = torch.linalg.eigh(cov.cpu())  # ascending eigenvalues
        top = vectors.flip(-1)[..., :dim]  # (L, H, D), largest first
        peak = top.gather(1, top.abs().argmax(1, keepdim=True))  # (L, 1, D)
        top = top * torch.where(peak < 0, -1.0, 1.0).to(top.dtype)
        return mean.float().cpu(), top.float().contiguous()


def fit_pca(states_fn, batches, layers: list[int], hidden: int, dim: int, seed: int, device) -> Projection:
    """Fit on the real tokens of ``batches``: an iterable of (input_ids, attention_mask)
    device tensors; ``states_fn(ids, mask)`` returns the L hidden states (B, T, H)."""
    moments = Moments(len(layers), hidden, device)
    with torch.inference_mode():
        for ids, mask in batches:
            states = states_fn(ids, mask)
            real = mask.bool()
            for j, layer in enumerate(layers):
                moments.add(j, states[layer][real])
            moments.n += int(real.sum())
    mean, matrix = moments.pca(dim)
    return Projection("pca", dim, seed, list(layers), mean, matrix, moments.n)
