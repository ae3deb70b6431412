"""Pooling hidden states over the real (non-padding) tokens, on the device.

Shapes: h (B, T, H) for one layer (or (B, L, T, H) for several), mask (B, T) with 1 on
real tokens (right padding, as ``tokenize.collate`` builds it), lengths
n_b = sum_t mask[b, t] >= 1. All return float32 (B, H) or (B, L, H):

    mean:  sum_t mask[b,t] h[b,t] / n_b
    cls:   h[b, 0]                        (first token: [CLS] / <s>)
    last:  h[b, n_b - 1]                  (last real token: what a causal model has read fully)
    max:   max over {t : mask[b,t] = 1} of h[b, t]   (elementwise)
"""

from __future__ import annotations

import torch


def _mask(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) -> (B, T) for one layer, (B, 1, T) for (B, L, T, H): broadcasts over layers."""
    return mask.reshape(mask.shape[0], *([1] * (h.dim() - 3)), mask.shape[1])


def mean_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = _mask(h, mask).to(torch.float32)
    # a matmul (.., 1, T) @ (.., T, H): no (B, T, H) temporary as with (h * mask).sum
    return (m.unsqueeze(-2) @ h.float()).squeeze(-2) / m.sum(-1, keepdim=True).clamp_min(1.0)


def cls_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return h[..., 0, :].float()


def last_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    last = mask.long().sum(1).clamp_min(1) - 1  # (B,)
    return h[torch.arange(h.shape[0], device=h.device), ..., last, :].float()


def max_pool(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    pad = ~_mask(h, mask).bool().unsqueeze(-1)  # (.., T, 1)
    return h.float().masked_fill(pad, float("-inf")).amax(-2)


POOLERS = {"mean": mean_pool, "cls": cls_pool, "last": last_pool, "max": max_pool}


def pool(kind: str, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, [L,] T, H), (B, T) -> (B, [L,] H) float32."""
    return POOLERS[kind](h, mask)
