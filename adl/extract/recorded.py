"""The backbone a cache's manifest records, found and checked again: ``recorded_backbone``.

Everything that runs a backbone after extraction (``adl predict``, ``adl serve``, the Python
Predictor, ``adl finetune``) starts from the manifest's ``model`` entry, here and nowhere else:

- where to load it from: the recorded id, or for an alias such as ``minilm`` the alias resolved
  again (a package folder moves when the package is reinstalled);
- which stack's states: the encoder's, or an encoder-decoder's decoder;
- whether its code may run (``trust_remote_code``, as at extraction);
- that it is the same model: its config hash must equal the recorded one;
- at the recorded hub revision: config, tokenizer and weights all load at that commit;
- with the same tokenizer: ``check_tokenizer`` compares its fingerprint with the recorded one.
"""

from __future__ import annotations

import dataclasses
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
    tokenizer_hash,
)


@dataclass(frozen=True, eq=False)
class RecordedBackbone:
    """The recorded backbone, found and checked; its weights load with ``load(plan)``."""

    model_id: str  # where it loads from now
    trust_remote_code: bool
    config: Any  # its transformers config
    info: ModelInfo  # info.revision: the recorded hub commit (None for a local folder)

    def load(self, plan: DevicePlan) -> Backbone:
        return Backbone(self.info, plan, self.trust_remote_code)

    def tokenizer(self, task: str):
        """The extraction's tokenizer for ``task``, at the recorded revision (check it with ``check_tokenizer``)."""
        return load_tokenizer(self.model_id, task, self.trust_remote_code, self.info.revision)


def check_tokenizer(manifest: dict, fingerprint: str, whose: str) -> None:
    """AdlError (one line naming the field) when a tokenizer's ``fingerprint``
    (``tokenizer_hash``: vocabulary, merges, normaliser, special tokens, options) differs from
    ``tokenizer.sha256``, the one the cache recorded in ``manifest`` was extracted with. The
    tokenizer must be loaded for the manifest's task. Manifests from before the fingerprint was
    recorded pass. The caller hashes once per tokenizer: a hash costs a ``save_pretrained``."""
    recorded = manifest.get("tokenizer", {}).get("sha256")
    if recorded is not None and fingerprint != recorded:
        raise AdlError(f"the tokenizer of {manifest['model']['id']} is not the one {whose} was extracted with "
                       "(tokenizer.sha256 differs: its vocabulary, normaliser or options changed): install or point "
                       "to the same tokenizer, or re-extract and retrain")


def recorded_backbone(manifest: dict, whose: str) -> RecordedBackbone:
    """The backbone ``manifest`` (a cache's, or its copy in a run folder) records; ``whose`` names
    that folder in the one-line error when the model found there is another one."""
    model = manifest["model"]
    name = model.get("name")
    model_id = resolve_model_id(name) if name in (*ALIASES, "minilm") else model["id"]
    trust = bool(model.get("trust_remote_code", False))
    revision = model.get("revision")
    config = load_config(model_id, trust, revision)
    info = describe(model_id, config, model["states"] == "decoder" and model["family"] == "encoder-decoder")
    info = dataclasses.replace(info, revision=revision)  # weights and tokenizer load at the recorded commit
    if info.config_hash != model["config_hash"]:
        raise AdlError(f"the backbone at {model_id} is not the one {whose} was made with (its config hash "
                       "differs): install or point to the same model")
    return RecordedBackbone(model_id, trust, config, info)
