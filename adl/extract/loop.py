"""The extraction loop: one forward per batch, pooled/projected on the device, written behind.

Per batch b of B rows padded to T tokens (n real tokens), with L' stored layers:

    states  = backbone(ids (B, T), mask (B, T))      L tensors (B, T, H), freed after the batch
    pooled  = stack_j pool(states[l_j], mask)        (B, L', H) per pool
    tokens  = proj(stack_j states[l_j][mask])        (n, L', D)

Only this batch's states live on the device; the host holds its outputs until the background
writer has stored them (a bounded queue of a couple of batches). Batch b is committed right
after its writes, so a kill loses at most the batches in flight and a rerun starts at the
first uncommitted batch with exactly the same rows: the finished cache is bit-identical.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from adl.cache.projection import Projection
from adl.errors import AdlError
from adl.extract.pooling import pool
from adl.extract.tokenize import TokenizedSplit, collate


@dataclass(frozen=True, eq=False)
class Outputs:
    """What each batch produces: pooled arrays per pool and/or the token states."""

    layers: list[int]  # absolute hidden-state indices, ascending
    pools: list[str]  # empty: no pooled view
    tokens: bool
    projection: Projection | None  # on the backbone's device
    dtype: torch.dtype  # storage dtype

    def compute(self, states: tuple[torch.Tensor, ...], mask: torch.Tensor) -> dict[str, torch.Tensor]:
        """-> {"pooled_<pool>": (B, L', H), "tokens": (n, L', D)} in the storage dtype, on the device.

        Layer by layer: stacking the states first, (B, L', T, H), would copy all of them
        (measured 15x slower than per-layer pooling on CPU at T = 271).
        """
        chosen = [states[i] for i in self.layers]
        out = {f"pooled_{p}": torch.stack([pool(p, h, mask) for h in chosen], 1) for p in self.pools}
        if self.tokens:
            real = mask.bool()
            tokens = torch.stack([h[real] for h in chosen], 1)  # (n, L', H): padding dropped
            out["tokens"] = self.projection.apply(tokens) if self.projection is not None else tokens.float()
        return {k: v.to(self.dtype) for k, v in out.items()}


def to_device(array: np.ndarray, plan) -> torch.Tensor:
    """Host -> device; through pinned memory with a non-blocking copy on CUDA only."""
    t = torch.from_numpy(array)
    if plan.pin_memory:
        return t.pin_memory().to(plan.device, non_blocking=True)
    return t.to(plan.device)


def to_host(outs: dict[str, torch.Tensor], plan, split: str, layers: list[int]) -> dict[str, np.ndarray]:
    """Device -> numpy, refusing NaN/inf anywhere (NaN from the model or fp16 autocast, inf
    from the model or from the cast to float16) with one line naming the split and layer.

    The test is one reduction per array on the device (a sum is finite exactly when every
    value is; a float32 sum of float16 values cannot overflow), synced together with the
    copies; only a failing batch is searched layer by layer. On CUDA the copies go through
    pinned memory (non-blocking, one sync).
    """
    sums = {k: v.sum(dtype=torch.float64 if v.dtype == torch.float64 else torch.float32) for k, v in outs.items()}
    if plan.pin_memory:
        host = {k: torch.empty(v.shape, dtype=v.dtype, pin_memory=True) for k, v in outs.items()}
        for k, v in outs.items():
            host[k].copy_(v, non_blocking=True)
        torch.cuda.current_stream(plan.device).synchronize()  # the copies must land before numpy reads them
        arrays = {k: v.numpy() for k, v in host.items()}
    else:
        arrays = {k: v.numpy() for k, v in outs.items()}
    bad = [k for k, total in sums.items() if not bool(torch.isfinite(total))]
    if bad:
        raise nonfinite_error(split, {k: outs[k] for k in bad}, layers, plan)
    return arrays


def nonfinite_error(split: str, bad: dict[str, torch.Tensor], layers: list[int], plan) -> AdlError:
    """Which layers hold NaN or inf, and the way out that fits the cause."""
    hit = sorted({layers[j] for v in bad.values() for j in range(v.shape[1]) if not torch.isfinite(v[:, j]).all()})
    nan = any(bool(torch.isnan(v).any()) for v in bad.values())
    where = f"split '{split}', layer{'s' if len(hit) > 1 else ''} {', '.join(map(str, hit))} ({', '.join(bad)})"
    if not nan and all(v.dtype == torch.float16 for v in bad.values()):
        return AdlError(f"hidden states overflow float16 in {where} (values beyond 65504): rerun with "
                        "--dtype float32 --overwrite")
    if nan and plan.autocast == torch.float16:
        return AdlError(f"hidden states are NaN in {where} under float16 autocast: rerun with --device cpu "
                        "--overwrite, or on a GPU with bfloat16")
    return AdlError(f"hidden states are {'NaN' if nan else 'infinite'} in {where}: the backbone itself produces "
                    "them on this data; check the model's weights")


def batch_starts(ts: TokenizedSplit, batches: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """First row and first token of every batch within the shard's part of the split."""
    rows = np.concatenate([[0], np.cumsum([len(b) for b in batches])]).astype(np.int64)
    toks = np.concatenate([[0], np.cumsum([int(ts.lengths[b].sum()) for b in batches])]).astype(np.int64)
    return rows, toks


def run_split(backbone, ts: TokenizedSplit, batches: list[np.ndarray], first: int, outputs: Outputs,
              writer, pad: int, advance=None) -> None:
    """Extract ``batches[first:]`` of split ``ts`` and queue their writes and commits."""
    rows, toks = batch_starts(ts, batches)
    plan = backbone.plan
    with torch.inference_mode():
        for b in range(first, len(batches)):
            ids, mask = collate(ts, batches[b], pad)
            ids_t, mask_t = to_device(ids, plan), to_device(mask, plan)
            states = backbone.hidden_states(ids_t, mask_t)
            host = to_host(outputs.compute(states, mask_t), plan, ts.name, outputs.layers)
            del states  # free this batch's L x (B, T, H) before the next forward
            for name, data in host.items():
                writer.write(ts.name, name, int(toks[b] if name == "tokens" else rows[b]), data)
            writer.commit(ts.name, b + 1)
            if advance is not None:
                advance(len(batches[b]), int(mask.sum()))
