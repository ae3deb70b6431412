"""Tiny random backbones and data files for the extract tests, built from configs (no downloads).

Each ``*_folder(path)`` saves a model and its tokenizer with save_pretrained, so the folder is
what a user would pass as ``--model``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

WORDS = ("the a cat dog sat on mat good bad movie is was very not really great awful fun plot actor "
         "london paris john mary google monday film story ending music").split()
ENTITIES = {"london": "B-loc", "paris": "B-loc", "john": "B-per", "mary": "B-per", "google": "B-org"}


def sentences(n: int, seed: int = 0, low: int = 1, high: int = 24) -> list[list[str]]:
    """n word lists of varied length (so batches pad differently)."""
    rng = np.random.default_rng(seed)
    return [list(rng.choice(WORDS, size=int(rng.integers(low, high)))) for _ in range(n)]


def write_csv(path: Path, n: int = 60, seed: int = 0) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for words in sentences(n, seed):
            w.writerow([" ".join(words), "pos" if words.count("good") >= words.count("bad") else "neg"])
    return path


def write_conll(path: Path, n: int = 60, seed: int = 0) -> Path:
    lines = []
    for words in sentences(n, seed, 1, 14):
        lines += [f"{w}\t{ENTITIES.get(w, 'O')}" for w in words] + [""]
    path.write_text("\n".join(lines) + "\n")
    return path


def _save(model, tok, path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def bert_folder(path: Path, seed: int = 0, **overrides) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizer

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "##s", "##ing"]
    tok = BertTokenizer(vocab={w: i for i, w in enumerate(vocab)})
    kw = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
              intermediate_size=37, max_position_embeddings=64)
    torch.manual_seed(seed)
    return _save(BertModel(BertConfig(**{**kw, **overrides})).eval(), tok, path)


def _bpe():
    """A byte-level BPE trained on the tiny corpus: RoBERTa/GPT-2/BART style."""
    from tokenizers import ByteLevelBPETokenizer

    bpe = ByteLevelBPETokenizer()
    corpus = [" ".join(s) for s in sentences(200, 1)]
    bpe.train_from_iterator(corpus, vocab_size=320, min_frequency=1,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>", "<mask>"], show_progress=False)
    return bpe


def _vocab_merges(tmp: Path):
    bpe = _bpe()
    tmp.mkdir(parents=True, exist_ok=True)
    bpe.save_model(str(tmp))
    merges = [tuple(line.split()) for line in (tmp / "merges.txt").read_text().splitlines()[1:] if line]
    return bpe.get_vocab(), merges


def roberta_folder(path: Path, seed: int = 0) -> Path:
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizer

    vocab, merges = _vocab_merges(path.parent / f"{path.name}-bpe")
    tok = RobertaTokenizer(vocab=vocab, merges=merges)
    torch.manual_seed(seed)
    cfg = RobertaConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=66, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _save(RobertaModel(cfg).eval(), tok, path)


def bart_folder(path: Path, seed: int = 0) -> Path:
    from transformers import BartConfig, BartModel, RobertaTokenizer

    vocab, merges = _vocab_merges(path.parent / f"{path.name}-bpe")
    tok = RobertaTokenizer(vocab=vocab, merges=merges)  # BART uses RoBERTa's byte-level BPE
    torch.manual_seed(seed)
    cfg = BartConfig(vocab_size=len(vocab), d_model=32, encoder_layers=2, decoder_layers=3,
                     encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=37, decoder_ffn_dim=37,
                     max_position_embeddings=64, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                     eos_token_id=tok.eos_token_id, decoder_start_token_id=tok.eos_token_id,
                     forced_eos_token_id=None)
    return _save(BartModel(cfg).eval(), tok, path)


def gpt2_folder(path: Path, seed: int = 0) -> Path:
    from transformers import GPT2Config, GPT2Model, GPT2Tokenizer

    vocab, merges = _vocab_merges(path.parent / f"{path.name}-bpe")
    tok = GPT2Tokenizer(vocab=vocab, merges=merges, unk_token="<unk>", bos_token="</s>", eos_token="</s>")
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=len(vocab), n_embd=32, n_layer=2, n_head=2, n_positions=64,
                     bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
    return _save(GPT2Model(cfg).eval(), tok, path)


def direct_states(folder: Path, texts: list, decoder: bool = False, words: bool = False, max_length: int = 64):
    """Hidden states of each example run alone (no padding), as a list of (L, T, H) arrays."""
    from transformers import AutoModel

    from adl.extract.models import load_tokenizer

    tok = load_tokenizer(str(folder), "token" if words else "sequence")
    model = AutoModel.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, truncation=True, max_length=max_length, is_split_into_words=words, return_tensors="pt")
            ids, mask = enc["input_ids"], enc["attention_mask"]
            if model.config.is_encoder_decoder and not decoder:
                hs = model.get_encoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            elif model.config.is_encoder_decoder:
                start = torch.full_like(ids[:, :1], model.config.decoder_start_token_id)
                dec = torch.cat([start, ids[:, :-1]], 1)
                hs = model(input_ids=ids, attention_mask=mask, decoder_input_ids=dec,
                           output_hidden_states=True).decoder_hidden_states
            else:
                hs = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
            out.append(torch.stack(hs, 0)[:, 0].numpy())
    return out
