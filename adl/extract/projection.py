"""Fitting the stored projection (``adl.cache.projection``: the map, its file and its use).

    stored_i = (gelu(Z_i) - mu_i) @ P_i          Z_i: (n, H), mu_i: (H,), P_i: (H, D)

- ``pca``: mu_i and P_i are the mean and the top-D principal directions (columns, unit norm,
  sign fixed so each column's largest-magnitude entry is positive) of gelu(Z_i) over a
  seeded sample of train tokens, taken from one small backbone pass before extraction.
- ``random``: mu_i = 0 and P_i has N(0, 1/D) entries from a seeded generator
  (Johnson-Lindenstrauss: norms and inner products kept in expectation).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from adl.cache.projection import Projection
from adl.errors import AdlError


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
