"""Combining the candidates `adl train` trained: a weighted average of their probabilities.

    p(y | x) = sum_m w_m softmax(f_m(x))       w on the simplex (w_m >= 0, sum_m w_m = 1)

``Ensemble`` is that mix as one head: it returns log p as its logits (softmax(log p) = p, so
decoding and argmax see the mix), reads one view and hands it to every member. Sequence heads
mean-pool a tokens view over real tokens themselves (``heads.task_input``), so a tokens head, a
pooled head and a probe ride on one tokens view, and on one backbone pass when served; with no
tokens member the ensemble reads the pooled view.

The weights are chosen on validation from a grid of step 1/STEPS over the simplex (single
members, pairs and the uniform mix are on it), best selection metric first; among ties the mix
nearest to uniform wins (averaging is the safer bet when validation cannot tell), then the one
with fewer members. Sequence tasks average (N, C) probabilities; token tasks average per
position (the flat (tokens, C) of every real token, in cache order) and score entity F1 on words,
like every head (``adl.train.trainer.score``).

A coarse grid, not a continuous optimiser: with a few hundred validation examples a finer
choice would fit validation noise.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from adl.train.data import SplitData
from adl.train.heads import LinearProbe, head_from_spec, head_spec
from adl.train.metrics import selection_metric
from adl.train.probe import chosen_c, refit_probe
from adl.train.trainer import predict, score

STEPS = 6  # grid step 1/6: holds 1, 1/2, 1/3 and 1/6 mixes
REFIT_PROBE = False  # refit a probe member on train + validation once the mix is chosen (see ``mixed``)


@torch.no_grad()
def probabilities(head: nn.Module, split: SplitData, batch_size: int) -> np.ndarray:
    """softmax of the head's logits in cache order: (N, C) for sequence tasks, (tokens, C) for token tasks."""
    head.eval()
    out = []
    for b in split.batches(batch_size):
        p = torch.softmax(head(b.z, b.mask).float(), -1)
        out.append(p[b.mask] if split.task == "token" else p)
    return torch.cat(out).cpu().numpy()


def simplex(m: int, steps: int = STEPS) -> list[tuple[float, ...]]:
    """Every weight vector of ``m`` entries in multiples of 1/steps that sums to 1."""
    return [tuple(c / steps for c in combo) for combo in itertools.product(range(steps + 1), repeat=m)
            if sum(combo) == steps]


def mix(probs: list[np.ndarray], weights) -> np.ndarray:
    return sum(w * p for w, p in zip(weights, probs) if w > 0)


@dataclass(frozen=True)
class Choice:
    weights: tuple[float, ...]
    validation: dict  # full metrics of the mix on validation


def choose_weights(probs: list[np.ndarray], split: SplitData, label_names: list[str]) -> Choice:
    """The grid point with the best validation metric (ties: nearest uniform, then fewer members)."""
    metric, m = selection_metric(split.task), len(probs)
    best, key_best = None, None
    for w in simplex(m):
        val = score(mix(probs, w).argmax(-1), split, label_names)
        used = [x for x in w if x > 0]
        spread = float(np.sum((np.asarray(used) - 1 / len(used)) ** 2))  # 0 for an even mix of its members
        key = (val[metric], -spread, len(used))
        if key_best is None or key > key_best:
            best, key_best = Choice(w, val), key
    return best


def evaluate_mix(probs: list[np.ndarray], weights, split: SplitData, label_names: list[str]) -> dict:
    return score(mix(probs, weights).argmax(-1), split, label_names)


def build_from_spec(spec: dict) -> nn.Module:
    """Any head a run folder holds, from its spec: an Ensemble, or one head (``heads.head_from_spec``)."""
    if spec.get("name") == "ensemble":
        return Ensemble(**{k: v for k, v in spec.items() if k != "name"})
    return head_from_spec(spec)


class Ensemble(nn.Module):
    """Members (trained heads of one task on the same layers) mixed with fixed ``weights`` (M,)."""

    def __init__(self, members: list[dict] | list[nn.Module], weights: list[float], task: str):
        super().__init__()
        built = [build_from_spec(m) if isinstance(m, dict) else m for m in members]
        self.members = nn.ModuleList(built)
        self.task = task
        self.register_buffer("mix_weights", torch.tensor([float(w) for w in weights]), persistent=False)
        self.spec = {"name": "ensemble", "members": [head_spec(m) for m in built],
                     "weights": [float(w) for w in weights], "task": task}

    def forward(self, z: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """z: (B, T, L, D) with mask (B, T), or (B, L, D) -> log of the mixed probabilities (B, [T,] C)."""
        p = sum(w * torch.softmax(m(z, mask).float(), -1) for w, m in zip(self.mix_weights, self.members))
        return torch.log(p.clamp_min(1e-30))

    def weights(self) -> torch.Tensor:
        """(L,) the members' layer weights, mixed: a layer no member reads has weight 0."""
        return sum(w * m.weights().float() for w, m in zip(self.mix_weights, self.members))

    def entropy(self) -> torch.Tensor:
        return self.mix_weights.new_zeros(())


@dataclass
class Mixed:
    """What `adl train` keeps: ``head`` (an Ensemble, or the one member that got all the weight)."""

    name: str  # "ensemble" or the kept head's name
    head: nn.Module
    view: str
    info: dict  # head.json's task, layers, view, pool, projection, label_names, cache_hash
    validation: dict  # full metrics of the mix on validation
    test: dict | None
    doc: dict  # metrics.json's "mix": members, weights, and the variants' scores


def shareable(tried: list, best, cache) -> list:
    """The candidates that can read one view: all of them, unless the cache stores projected
    tokens (a pooled head then reads other states than a tokens head sees): then the best's view's."""
    if not cache.manifest.get("projection"):
        return list(tried)
    return [t for t in tried if t.view == best.view]


def mixed(tried: list, best, cache) -> Mixed:
    """Mix the trained candidates (run.Trained: cfg, head, data, result, view, info) with weights
    chosen on validation; ``best`` is the best single candidate.

    Every member is scored on the view the mix reads (tokens when a candidate reads tokens: a
    pooled member mean-pools them, as it will when served), and the kept head is scored again on
    its own view, so metrics.json is what the saved head predicts. For the record (metrics.json
    "mix"/"variants") it also scores the mix with every probe refit on train + validation;
    REFIT_PROBE decides whether the kept head uses the refit probes."""
    pool = shareable(tried, best, cache)
    bs, metric, names = best.cfg.batch_size, selection_metric(best.data.task), best.data.label_names
    view = next((t.data for t in pool if t.view == "tokens"), best.data)  # what every member can read
    choice = choose_weights([probabilities(t.head, view.validation, bs) for t in pool], view.validation, names)
    heads = [t.head for t in pool]
    refit = [_refit(t) if isinstance(t.head, LinearProbe) else t.head for t in pool]
    variants = {"best single": {"head": best.cfg.head, "validation": best.result.validation[metric],
                                "test": (best.result.test or {}).get(metric)},
                "mix": {"weights": list(choice.weights), "validation": choice.validation[metric]}}
    if view.test is not None:
        for key, hs in (("mix", heads), ("mix, probes refit on train+validation", refit)):
            probs = [probabilities(h, view.test, bs) for h in hs]
            variants.setdefault(key, {"weights": list(choice.weights)})["test"] = evaluate_mix(
                probs, choice.weights, view.test, names)[metric]
    members = [i for i, w in enumerate(choice.weights) if w > 0]
    chosen = [(refit if REFIT_PROBE else heads)[i] for i in members]
    owner = next((pool[i] for i in members if pool[i].view == "tokens"), pool[members[0]])  # its view and head.json
    if len(members) == 1:
        name, head = owner.cfg.head, chosen[0]
    else:
        name, head = "ensemble", Ensemble(chosen, [choice.weights[i] for i in members], owner.data.task)
    own = owner.data
    validation = score(predict(head, own.validation, bs), own.validation, names)
    test = None if own.test is None else score(predict(head, own.test, bs), own.test, names)
    doc = {"members": [{"head": pool[i].cfg.head, "view": pool[i].view, "weight": choice.weights[i]} for i in members],
           "grid_step": 1 / STEPS, "probes_refit": REFIT_PROBE, "variants": variants}
    return Mixed(name, head, owner.view, owner.info, validation, test, doc)


def _refit(trained) -> nn.Module:
    """A copy of a fitted probe, fitted again on train + validation with its chosen C."""
    head = copy.deepcopy(trained.head)
    refit_probe(head, trained.data, chosen_c(trained.result))
    return head
