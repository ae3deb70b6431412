"""A head from a config (``make_head``), to a run folder (``save_head``) and back (``load_head``).

A run folder's head is two files:

    head.safetensors   the head's tensors (contiguous, CPU; no pickles)
    head.json          {"spec": name + constructor kwargs, "label_names", "layers", "task", "view",
                        "projection", "cache_hash", "epoch", "adl_version"}

The spec alone rebuilds the module, including whether its mix applies GELU (``activation``:
False when the cache stored its tokens after GELU), so ``load_head`` needs nothing else.
"""

from __future__ import annotations

from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import nn

from adl import __version__
from adl.cache import read_json, write_json
from adl.errors import AdlError
from adl.train.heads import build_head, head_from_spec, head_hparams, head_spec


def gelu_in_cache(manifest: dict, view: str) -> bool:
    """True when the cache's tokens were stored as P GELU(Z): the head must not apply GELU again."""
    proj = manifest.get("projection")
    return view == "tokens" and isinstance(proj, dict) and proj.get("activation") == "gelu"


def make_head(cfg, data, manifest: dict, *, name: str | None = None, **extra) -> nn.Module:
    """Build head ``name`` (default cfg.head, a resolved TrainConfig) for ``data`` (TrainData).

    single-layer on a pooled view is adalayers-pooled with a one-hot mix (``fixed_layer``).
    ``extra`` overrides (baselines pass layer=i or layers=[...]).
    """
    name = name or cfg.head
    values = dict(k=cfg.k, alpha=cfg.alpha, cutoff=cfg.cutoff, dropout=cfg.dropout, heads=cfg.heads,
                  pos_emb=cfg.pos_emb, max_len=max(512, data.max_len), layers_enc=cfg.layers_enc, ff=cfg.ff,
                  norm_affine=cfg.norm_affine, post_gelu=cfg.post_gelu, hidden=cfg.hidden, layer=cfg.layer,
                  activation=not gelu_in_cache(manifest, data.view))
    values.update(extra)
    if name == "single-layer" and data.view != "tokens":
        name, values["fixed_layer"] = "adalayers-pooled", values.pop("layer")
    kwargs = {k: v for k, v in values.items() if k in head_hparams(name) and v is not None}
    return build_head(name, n_layers=data.n_layers, in_dim=data.in_dim, n_classes=len(data.label_names),
                      task=data.task, **kwargs)


def save_head(out: Path, head: nn.Module, info: dict) -> None:
    """head.safetensors (written aside, then renamed) + head.json (spec and what the tensors mean)."""
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    tmp = out / ".head.safetensors.tmp"
    save_file(state, str(tmp))
    tmp.replace(out / "head.safetensors")
    write_json(out / "head.json", {**info, "spec": head_spec(head), "adl_version": __version__})


def load_head(run_dir) -> tuple[nn.Module, dict]:
    """Rebuild a trained head from a run folder alone: (head in eval mode, head.json contents)."""
    run_dir = Path(run_dir)
    if not (run_dir / "head.json").is_file() or not (run_dir / "head.safetensors").is_file():
        raise AdlError(f"{run_dir} holds no trained head (head.json + head.safetensors); train one with `adl train`")
    info = read_json(run_dir / "head.json")
    head = head_from_spec(info["spec"])
    head.load_state_dict(load_file(str(run_dir / "head.safetensors")))
    return head.eval(), info
