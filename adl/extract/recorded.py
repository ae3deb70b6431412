"""The backbone a cache's manifest records, found and checked again: ``recorded_backbone``.

Everything that runs a backbone after extraction (``adl predict``, ``adl serve``, the Python
Predictor, ``adl finetune``) starts from the manifest's ``model`` entry, here and nowhere else:

- where to load it from: the recorded id, or for an alias such as ``minilm`` the alias resolved
  again (a package folder moves when the package is reinstalled);
- which stack's states: the encoder's, or an encoder-decoder's decoder;
- whether its code may run (``trust_remote_code``, as at extraction);
- that it is the same model: its config hash must equal the recorded one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from adl.errors import AdlError
from adl.extract.models import (
    ALIASES,
    Backbone,
    DevicePlan,
    ModelInfo,
    describe,
    load_config,
    load_tokenizer,
    resolve_model_id,
)


@dataclass(frozen=True, eq=False)
class RecordedBackbone:
    """The recorded backbone, found and checked; its weights load with ``load(plan)``."""

    model_id: str  # where it loads from now
    trust_remote_code: bool
    config: Any  # its transformers config
    info: ModelInfo

    def load(self, plan: DevicePlan) -> Backbone:
        return Backbone(self.info, plan, self.trust_remote_code)

    def tokenizer(self, task: str):
        """The extraction's tokenizer for ``task``."""
        return load_tokenizer(self.model_id, task, self.trust_remote_code)


def recorded_backbone(manifest: dict, whose: str) -> RecordedBackbone:
    """The backbone ``manifest`` (a cache's, or its copy in a run folder) records; ``whose`` names
    that folder in the one-line error when the model found there is another one."""
    model = manifest["model"]
    name = model.get("name")
    model_id = resolve_model_id(name) if name in (*ALIASES, "minilm") else model["id"]
    trust = bool(model.get("trust_remote_code", False))
    config = load_config(model_id, trust)
    info = describe(model_id, config, model["states"] == "decoder" and model["family"] == "encoder-decoder")
    if info.config_hash != model["config_hash"]:
        raise AdlError(f"the backbone at {model_id} is not the one {whose} was made with (its config hash "
                       "differs): install or point to the same model")
    return RecordedBackbone(model_id, trust, config, info)
