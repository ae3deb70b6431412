"""The backbone made trainable by one peer method, plus a linear task head.

    sequence:  logits = W dropout(pool(h, mask)) + b      h: (B, T, H) last hidden state
    token:     logits = W dropout(h) + b                  (B, T, C), one row per sub-token

``pool`` is the cache's pool (mean unless the cache stored another). Prompt methods prepend
n virtual tokens (B, n + T, H); their positions are dropped before pooling or tagging.

Methods: full (every weight), bitfit (every bias), lora (PEFT LoraConfig, PEFT's default
target modules for the model type), prompt (PEFT PromptTuningConfig), ptuning-bias (PEFT
PromptEncoderConfig, an MLP encoder, plus every nn.Linear bias).
"""

from __future__ import annotations

import torch
from torch import nn

from adl.errors import AdlError
from adl.extract.models import Backbone
from adl.extract.pooling import pool


class PeerModel(nn.Module):
    def __init__(self, body: nn.Module, hidden: int, n_classes: int, task: str, pool_kind: str,
                 n_virtual: int, dropout: float, shift_right=None):
        super().__init__()
        self.body, self.task, self.pool_kind, self.n_virtual = body, task, pool_kind, n_virtual
        self.shift_right = shift_right  # encoder-decoder models read as decoders: the decoder's input
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden, n_classes)

    def weights(self) -> torch.Tensor:
        """(0,): a peer mixes no layers (the training loop logs a head's layer weights)."""
        return torch.zeros(0)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B, T), (B, T) -> (B, C) or (B, T, C)."""
        kw = {}
        if self.shift_right is not None:
            kw = {"decoder_input_ids": self.shift_right(input_ids), "decoder_attention_mask": attention_mask}
        out = self.body(input_ids=input_ids, attention_mask=attention_mask, **kw)
        h = out.last_hidden_state[:, self.n_virtual:]  # (B, T, H)
        if self.task == "token":
            return self.classifier(self.dropout(h))
        return self.classifier(self.dropout(pool(self.pool_kind, h, attention_mask)))


def build(backbone: Backbone, cfg, n_classes: int, task: str, pool_kind: str) -> PeerModel:
    """Backbone (loaded frozen by adl.extract.models) -> the peer model of ``cfg.method``."""
    info, model = backbone.info, backbone.model
    shift = None
    if info.family == "encoder-decoder" and info.states == "encoder":
        body = model.get_encoder()
    else:
        body = model
        shift = backbone.shift_right if info.family == "encoder-decoder" else None
    body.requires_grad_(False)
    n_virtual = 0
    if cfg.method == "full":
        body.requires_grad_(True)
    elif cfg.method == "bitfit":
        for name, p in body.named_parameters():
            p.requires_grad_(name.endswith("bias"))
    elif cfg.method == "lora":
        body = _peft(body, _lora_config(cfg), info.id, cfg.method)
    else:
        _check_prompt(body, info)
        body = _peft(body, _prompt_config(cfg), info.id, cfg.method)
        n_virtual = cfg.virtual_tokens
        if cfg.method == "ptuning-bias":
            for m in body.base_model.modules():
                if isinstance(m, nn.Linear) and m.bias is not None:
                    m.bias.requires_grad_(True)
    return PeerModel(body, info.hidden_size, n_classes, task, pool_kind, n_virtual, cfg.dropout, shift)


def _lora_config(cfg):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout)


def _prompt_config(cfg):
    from peft import PromptEncoderConfig, PromptTuningConfig, TaskType

    if cfg.method == "prompt":
        return PromptTuningConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=cfg.virtual_tokens)
    return PromptEncoderConfig(task_type=TaskType.FEATURE_EXTRACTION, num_virtual_tokens=cfg.virtual_tokens,
                               encoder_hidden_size=cfg.encoder_hidden, encoder_reparameterization_type="MLP")


def _check_prompt(body: nn.Module, info) -> None:
    """Prompt methods feed embeddings (inputs_embeds) to an encoder or a decoder-only model."""
    if info.family == "encoder-decoder":
        raise AdlError(f"--method prompt/ptuning-bias needs an encoder or a decoder-only model; {info.id} is an "
                       "encoder-decoder (its prompts would go to the encoder and the decoder): use lora, bitfit or full")
    try:
        emb = body.get_input_embeddings()
    except (NotImplementedError, AttributeError):
        emb = None
    if not isinstance(emb, nn.Embedding):
        raise AdlError(f"{info.id} exposes no input embeddings (get_input_embeddings), which prompt tuning "
                       "prepends its tokens to: use --method lora, bitfit or full")


def _peft(body: nn.Module, config, model_id: str, method: str) -> nn.Module:
    from peft import get_peft_model

    try:
        return get_peft_model(body, config)
    except (ValueError, NotImplementedError, AttributeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise AdlError(f"--method {method} cannot wrap {model_id} with PEFT ({first}); use --method full or bitfit")
