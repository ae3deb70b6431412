"""A head from a resolved config and the data it will read (``make_head``); the run folder that
stores it is ``adl.train.rundir`` (``save_head``, ``load_head``)."""

from __future__ import annotations

from torch import nn

from adl.train.heads import build_head, head_hparams


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
