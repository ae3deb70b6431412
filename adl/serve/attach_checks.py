"""What ``adl.attach`` checks on the user's model object and on each call.

Identity (refused with one line naming the field): the number of hidden states (the config's
layer count and the stack's list of layers), the config hash (as saved; entries that loading
sets on a model object, such as dtype and use_cache, are compared at their defaults), and,
where the wrapper exposes a tokenizer (sentence-transformers, pipeline), its fingerprint: the
tokenizer's files as ``save_pretrained`` writes them, without the settings that only change
how a call tokenises (max length, padding and truncation side), which are checked per call.

Tokenisation, per call and row (a warning once per kind, recorded per row): a row longer than
the runs' max_length, a row cut by the wrapper at a shorter length, special tokens other than
the extraction's, left padding without positions taken from the mask (``generate`` derives them
from the mask, so its left-padded prompts read as extraction's right-padded rows).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from adl.errors import AdlError
from adl.extract import models
from adl.extract.recorded import recorded_backbone
from adl.serve.taps import layer_lists, matching_layers

# Tokenizer settings that change how a call tokenises, not what the tokenizer is: tokenizer_config's
# (extraction loads a token task's tokenizer with add_prefix_space for pre-split words; a decoder's
# users set a pad token to batch prompts, and padding is masked) and the padding and truncation a
# fast tokenizer keeps in tokenizer.json after a call.
CALL_SETTINGS = ("model_max_length", "padding_side", "truncation_side", "add_prefix_space", "pad_token", "padding",
                 "truncation")


@dataclass(frozen=True)
class Expect:
    """How the runs' extraction tokenised: its max length, the wrapper's own cut (if any) and the
    special tokens every row starts and ends with (None: the run's tokenizer is not at hand)."""

    max_length: int
    cap: int | None
    prefix: tuple[int, ...] | None
    suffix: tuple[int, ...] | None


@dataclass(eq=False)
class Target:
    """The transformers model inside the user's object, and what the wrapper exposes."""

    kind: str  # "model" | "sentence-transformers" | "pipeline"
    wrapper: object
    model: torch.nn.Module
    tokenizer: object | None
    stack: torch.nn.Module  # the module whose hidden states the runs stored
    layers: torch.nn.ModuleList  # its layers: layer i's input is hidden state i
    pad_id: int | None
    cap: int | None
    entry: torch.nn.Module | None = None  # the module whose call is one pass (default: the stack)

    def __post_init__(self):
        # sentence-transformers calls the model's forward method, not the module (no stack hooks
        # run): its Transformer module's call is the pass, features in and token_embeddings out
        self.entry = self.wrapper[0] if self.kind == "sentence-transformers" else self.stack
        self._sig = inspect.signature(self.stack.forward)

    def inputs(self, args, kwargs) -> dict:
        """The entry call's arguments by name (input_ids, attention_mask, position_ids, cache...)."""
        if self.kind == "sentence-transformers":
            return dict(args[0] if args else kwargs["features"])
        return self._sig.bind_partial(*args, **kwargs).arguments

    def last(self, output) -> torch.Tensor:
        """The stack's last hidden state from the entry's output."""
        return output["token_embeddings"] if self.kind == "sentence-transformers" else output[0]

    def wrappers(self, attached) -> list[tuple[object, str, object]]:
        """(object, method name, replacement): the calls that show ``attached`` where a user's call
        starts and ends (generate, encode) and which texts it reads (the wrapper's preprocess)."""
        out = []
        if callable(getattr(self.model, "generate", None)) and hasattr(self.model, "generation_config"):
            generate = self.model.generate

            def generate_once(*args, **kwargs):
                ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
                start = attached.row_count()
                try:
                    return generate(*args, **kwargs)
                finally:
                    if isinstance(ids, torch.Tensor):
                        attached.one_row_per_prompt(start, ids.shape[0])
            out.append((self.model, "generate", generate_once))
        if self.kind == "model":
            return out
        w, preprocess = self.wrapper, self.wrapper.preprocess

        if self.kind == "pipeline":
            def seen_one(inputs, *args, **kwargs):
                attached.saw_texts([inputs])
                return preprocess(inputs, *args, **kwargs)
            return [*out, (w, "preprocess", seen_one)]

        encode = w.encode

        def seen(inputs, *args, **kwargs):
            attached.saw_texts(list(inputs))
            return preprocess(inputs, *args, **kwargs)

        def encode_in_order(inputs, *args, **kwargs):
            start = attached.row_count()
            try:
                return encode(inputs, *args, **kwargs)
            finally:
                attached.reorder(start, [inputs] if isinstance(inputs, str) else list(inputs))
        return [*out, (w, "preprocess", seen), (w, "encode", encode_in_order)]


def _kind(model) -> str:
    names = {f"{c.__module__}.{c.__name__}" for c in type(model).__mro__}
    if any(n.startswith("sentence_transformers.") and n.endswith(".SentenceTransformer") for n in names):
        return "sentence-transformers"
    if "transformers.pipelines.base.Pipeline" in names:
        return "pipeline"
    if "transformers.modeling_utils.PreTrainedModel" in names:
        return "model"
    raise AdlError(f"adl.attach needs a transformers model, a SentenceTransformer or a transformers pipeline, "
                   f"not {type(model).__name__}")


def unwrap(model, run) -> Target:
    """The user's object -> Target, after the identity checks against ``run``'s backbone."""
    kind = _kind(model)
    tok, cap = None, None
    if kind == "sentence-transformers":
        hf, tok, cap = model[0].auto_model, model.tokenizer, model.max_seq_length
    elif kind == "pipeline":
        hf, tok = model.model, model.tokenizer
    else:
        hf = model
    m = run.manifest["model"]
    if m["family"] == "encoder-decoder" and m["states"] == "decoder":
        raise AdlError(f"run {run.name} reads the decoder's states (extracted with --decoder), which the user's "
                       "generate does not compute on the input: use adl's Predictor for it")
    family = models.model_family(hf.config)
    want = int(m["num_hidden_states"])
    stack = hf.get_encoder() if family == "encoder-decoder" else hf.base_model
    got = models.num_layers(hf.config, family, "encoder") + 1
    candidates = layer_lists(stack, want - 1)
    if got == want and not candidates:
        got = f"{want} in its config, but no list of {want - 1} layers in its modules"
    if got != want:
        raise AdlError(f"this model is not the backbone of run {run.name}: its number of hidden states differs "
                       f"({got} vs {want}): attach the model the run names ({m['id']})")
    layers = candidates[0] if len(candidates) == 1 else _checked_layers(stack, want)
    if layers is None:
        raise AdlError(f"cannot attach heads to this {type(hf).__name__}: none of its lists of {want - 1} modules "
                       "takes the hidden states output_hidden_states returns (checked on a dummy batch)")
    if m["config_hash"] not in models.config_hashes(hf.config):
        raise AdlError(f"this model is not the backbone of run {run.name}: its config hash differs: attach the "
                       f"model the run names ({m['id']})")
    if tok is not None and not _same_tokenizer(tok, run):
        raise AdlError(f"this {kind} tokenises with another tokenizer than run {run.name} (its tokenizer "
                       f"fingerprint differs): load it from the run's model ({m['id']})")
    pad = _pad_id(hf, tok)
    return Target(kind, model, hf, tok, stack, layers, pad, cap)


def _checked_layers(stack, want: int):
    """Of several lists of ``want - 1`` modules, the one whose hooked states equal output_hidden_states
    on a dummy batch (``matching_layers``; the caller's random state is put back: dropout in train
    mode draws from it). Only then: asking for hidden states makes transformers install output
    hooks of its own on the model, which a single candidate list spares the user's model."""
    param = next(stack.parameters())
    vocab = int(getattr(stack.config, "vocab_size", 0) or 8)
    ids = (torch.arange(2, 10, device=param.device) % vocab)[None]
    mask = torch.ones_like(ids)
    with torch.random.fork_rng(devices=[param.device] if param.device.type == "cuda" else []), torch.inference_mode():
        expected = stack(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        return matching_layers(stack, want, lambda: stack(input_ids=ids, attention_mask=mask), expected)


def _pad_id(hf, tok) -> int | None:
    """The pad id ``generate`` would use: the tokenizer's or config's pad, else EOS."""
    gen = getattr(hf, "generation_config", None)
    for value in (getattr(tok, "pad_token_id", None), hf.config.pad_token_id, getattr(gen, "pad_token_id", None),
                  getattr(hf.config, "eos_token_id", None)):
        if isinstance(value, int):
            return value
    return None


def _same_tokenizer(tok, run) -> bool:
    """``tok``'s fingerprint (without CALL_SETTINGS) is the run's tokenizer's, as its model loads it
    for either task: byte-level BPE loaded for a token task has the prefix space extraction gives
    each pre-split word, and that setting also sits in tokenizer.json's pre-tokenizer and
    post-processor. True when the run's model is not at hand (nothing to compare)."""
    mine, compared = models.tokenizer_hash(tok, CALL_SETTINGS), False
    for task in dict.fromkeys((run.task, "sequence", "token")):
        ref = run_tokenizer(run, task)
        if ref is not None:
            compared = True
            if models.tokenizer_hash(ref, CALL_SETTINGS) == mine:
                return True
    return not compared


def run_tokenizer(run, task: str | None = None):
    """The tokenizer the run's extraction used (or would use for ``task``), when its model is at
    hand (else None)."""
    try:
        return recorded_backbone(run.manifest, f"run {run.root}").tokenizer(task or run.task)
    except (AdlError, OSError, ValueError):
        return None


def _ends(tok) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The special tokens the tokenizer puts before and after a text."""
    enc = tok("a", return_special_tokens_mask=True)
    ids, special = list(enc["input_ids"]), list(enc["special_tokens_mask"])
    first = special.index(0) if 0 in special else len(ids)
    last = len(ids) - special[::-1].index(0) if 0 in special else len(ids)
    return tuple(ids[:first]), tuple(ids[last:])


def expectations(target: Target, run) -> Expect:
    tok = target.tokenizer or run_tokenizer(run)
    prefix, suffix = _ends(tok) if tok is not None else (None, None)
    return Expect(int(run.manifest["tokenizer"]["max_length"]), target.cap, prefix, suffix)


def notes_for(ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor | None, expect: Expect) -> list[list[str]]:
    """Per row, how its tokenisation differs from extraction's (see the module docstring)."""
    ids_, mask_ = ids.cpu().numpy(), mask.cpu().numpy().astype(bool)
    pos = None if positions is None else positions.expand_as(ids).cpu().numpy()
    out = []
    for b in range(ids_.shape[0]):
        real = np.flatnonzero(mask_[b])
        row, notes = ids_[b, real], []
        if len(real) and real[-1] != len(real) - 1 and (pos is None or (pos[b, real] != np.arange(len(real))).any()):
            notes.append("left padding without positions from the mask (extraction padded on the right)")
        if len(real) > expect.max_length:
            notes.append(f"rows longer than the runs' max_length of {expect.max_length} tokens "
                         "(extraction truncated there)")
        elif expect.cap is not None and expect.cap < expect.max_length and len(real) == expect.cap:
            notes.append(f"rows cut at {expect.cap} tokens by the model's max length (extraction: "
                         f"{expect.max_length})")
        if expect.prefix is not None and (tuple(row[: len(expect.prefix)]) != expect.prefix or
                                          (expect.suffix and tuple(row[-len(expect.suffix):]) != expect.suffix)):
            notes.append(f"special tokens other than extraction's (rows start with {list(expect.prefix)} and end "
                         f"with {list(expect.suffix)} there)")
        out.append(notes)
    return out


def padded_without_mask(ids: torch.Tensor, pad_id: int | None) -> bool:
    """Rows of one batch that start with different numbers of pad tokens: padded prompts whose
    mask (absent, or all ones as ``generate`` makes it when pad = EOS) does not say so."""
    if pad_id is None or ids.shape[0] < 2:
        return False
    is_pad = (ids == pad_id).int()
    leading = is_pad.cumprod(1).sum(1)
    return bool((leading != leading[0]).any())
