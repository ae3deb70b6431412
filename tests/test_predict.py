"""The live path (Predictor) against the cache path, on tiny backbones of every family: the
same logits per example, the run's own test metrics, the backbone's output unchanged bit for
bit, early exit, and one-line errors."""

import json
import shutil

import numpy as np
import pytest
import torch
from tiny_backbones import bart_folder, bert_folder, gpt2_folder, roberta_folder, write_conll, write_csv

from adl.cache import open_cache
from adl.errors import AdlError
from adl.extract.config import ExtractConfig
from adl.extract.datasets import reload_dataset
from adl.extract.run import run_extract
from adl.extract.tokenize import collate, make_batches
from adl.serve import Predictor
from adl.train.config import TrainConfig
from adl.train.data import load_data
from adl.train.run import run_train

FAST = dict(k=8, heads=2, ff=16, lr=0.01, alpha=10.0, max_epochs=2)
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"root": root, "bert": bert_folder(root / "bert"), "roberta": roberta_folder(root / "roberta"),
            "bart": bart_folder(root / "bart"), "gpt2": gpt2_folder(root / "gpt2"),
            "csv": f"csv:{write_csv(root / 'd.csv')}", "conll": f"conll:{write_conll(root / 'd.conll')}"}


def make_run(assets, tmp, name, data="csv", head=None, extract=None, label=None, **train):
    cache, run = tmp / f"cache-{label or name}", tmp / (label or name)
    if head is None:  # one head per case (the one a tokens or a pooled view suggests), not adl's pick among several
        head = "adalayers" if "tokens" in (extract or {}).get("views", "pooled,tokens") else "adalayers-pooled"
    head = None if head == "default" else head  # `adl train` with no --head: its mix of candidates
    run_extract(ExtractConfig(model=str(assets[name]), dataset=assets[data], out=str(cache), batch_size=8,
                              progress=False, **(extract or {})))
    run_train(TrainConfig(cache=str(cache), out=str(run), head=head, device="cpu", **{**FAST, **train}))
    return cache, run


def cache_logits(cache_dir, run, split="test"):
    """id -> logits of the head applied to the cache (the training path)."""
    from adl.train.rundir import load_head

    head, info = load_head(run)
    cache = open_cache(cache_dir)
    part = getattr(load_data(cache, info["view"], device="cpu", seed=0, memory_gb=1.0), split)
    ids, out = cache.ids(split), {}
    with torch.no_grad():
        for b in part.batches(8):
            z = head(b.z, b.mask)
            for j, row in enumerate(b.index):
                n = int(b.mask[j].sum()) if b.mask is not None else None
                out[int(ids[row])] = (z[j, :n] if z.dim() == 3 else z[j]).numpy()
    return out


def live_logits(p, run, split="test"):
    """id -> logits of the Predictor on the run's own split (re-read from the recorded spec)."""
    ds = reload_dataset(p.manifest["dataset"]["spec"])
    s = ds.splits[split]
    enc = p.encode(list(s.texts if s.texts is not None else s.words))
    pred = p.forward(enc)
    return dict(zip(s.ids.tolist(), pred.logits[run.name])), ds


def assert_live_equals_cache(p, cache, run):
    """The Predictor's logits on the run's test split equal the cache path's, example by example."""
    live, _ = live_logits(p, p.runs[0])
    ref = cache_logits(cache, run)
    assert set(live) == set(ref)
    for i in ref:
        np.testing.assert_allclose(live[i], ref[i], **TOL)


CASES = [  # name, data, extract options, train options
    ("bert", "csv", dict(views="tokens"), {}),
    ("bert", "csv", dict(views="pooled"), {}),
    ("bert", "csv", dict(views="tokens", project=4), {}),
    ("bert", "csv", dict(views="pooled", dtype="float32"), dict(head="last-layer")),
    ("bert", "csv", dict(views="pooled,tokens"), dict(head="concat-probe")),  # adl train may keep a probe
    ("bert", "csv", dict(views="pooled,tokens"), dict(head="default")),  # or a mix of its candidates
    ("roberta", "conll", {}, dict(head="default")),
    ("roberta", "conll", {}, dict(head="concat-probe")),
    ("roberta", "conll", {}, {}),
    ("roberta", "conll", dict(project=4, project_method="random"), {}),
    ("bart", "csv", dict(views="pooled,tokens"), {}),
    ("bart", "csv", dict(views="tokens", decoder=True), {}),
    ("gpt2", "csv", dict(views="pooled"), {}),
    ("gpt2", "csv", dict(views="tokens"), dict(head="single-layer", layer=1)),
    ("bert", "csv", dict(views="pooled"), dict(head="scalar-mix")),
    ("bert", "csv", dict(views="pooled"), dict(head="head2toe")),
    ("bert", "csv", dict(views="pooled"), dict(head="linear-probe", layer=1)),
    ("roberta", "conll", {}, dict(head="scalar-mix")),  # a kept-inputs head on a token task
    ("bert", "csv", dict(views="tokens"), dict(head="head2toe")),  # mean-pooled from the tokens view
]


@pytest.mark.parametrize("name, data, extract, train", CASES)
def test_live_logits_equal_the_cache_path_and_metrics_match(assets, tmp_path, name, data, extract, train):
    cache, run = make_run(assets, tmp_path, name, data, extract=extract, **train)
    p = Predictor([run], device="cpu")
    assert_live_equals_cache(p, cache, run)
    # the CLI path scores the same split with the trainer's score: the run's own test metrics
    from adl.serve.predict_cmd import PredictConfig, run_predict

    res = run_predict(PredictConfig(runs=[str(run)], split="test", out=str(tmp_path / "p.jsonl")))
    reported = json.loads((run / "metrics.json").read_text())["test"]
    got = res["metrics"][run.name]
    for k, v in reported.items():
        if isinstance(v, float):
            assert abs(got[k] - v) <= 1e-4, (k, got[k], v)


def test_a_mix_of_a_tokens_head_a_pooled_head_and_a_probe_rides_one_pass(assets, tmp_path):
    """An Ensemble run reads the tokens view; its pooled members mean-pool it, live as on the cache."""
    from adl.train.ensemble import Ensemble
    from adl.train.rundir import load_head, save_head

    cache, run = make_run(assets, tmp_path, "bert", extract=dict(views="pooled,tokens"), label="tokens")
    members = [load_head(run)[0]]
    for head in ("adalayers-pooled", "concat-probe"):
        out = tmp_path / head
        run_train(TrainConfig(cache=str(cache), out=str(out), head=head, device="cpu", **FAST))
        members.append(load_head(out)[0])
    info = load_head(run)[1]
    save_head(run, Ensemble(members, [0.5, 1 / 3, 1 / 6], "sequence"), {k: v for k, v in info.items() if k != "spec"})
    p = Predictor([run], device="cpu")
    assert p.runs[0].info["spec"]["name"] == "ensemble"
    assert_live_equals_cache(p, cache, run)


def test_backbone_output_is_unchanged_bit_for_bit(assets, tmp_path):
    _, run = make_run(assets, tmp_path, "bert", extract=dict(views="pooled,tokens"))
    p = Predictor([run], device="cpu", batch_size=64)
    texts = ["good movie", "the cat sat on the mat very not good", "bad plot"]
    out = p(texts, return_backbone=True, return_embedding=True)
    enc = p.encode(texts)
    (rows,) = make_batches(enc.ts.lengths, 64)
    ids, mask = collate(enc.ts, rows, 0)
    with torch.inference_mode():
        direct = p.backbone.model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
    for b, i in enumerate(rows):
        n = int(mask[b].sum())
        assert torch.equal(out.backbone[i]["last_hidden_state"], direct.last_hidden_state[b, :n])
        assert torch.equal(out.backbone[i]["pooler_output"], direct.pooler_output[b])
        np.testing.assert_allclose(out.embeddings[i], direct.last_hidden_state[b, :n].mean(0).numpy(), rtol=1e-5,
                                   atol=1e-6)
    assert set(out.heads[run.name][0]) == {"label", "probs"}
    assert abs(sum(out.heads[run.name][0]["probs"].values()) - 1) < 1e-6


def test_early_exit_skips_the_layers_no_head_needs(assets, tmp_path):
    _, run = make_run(assets, tmp_path, "bert", extract=dict(views="tokens", layers="0,1"))
    p = Predictor([run], device="cpu")
    calls = []
    hook = p.taps.layers[1].register_forward_hook(lambda *a: calls.append(1))
    try:
        texts = ["good movie", "john sat in paris"]
        short = p(texts)
        assert calls == []  # layer 1 (the last encoder layer) never ran
        full = p(texts, return_backbone=True)
        assert calls == [1]
    finally:
        hook.remove()
    for a, b in zip(short.logits[run.name], full.logits[run.name]):
        np.testing.assert_array_equal(a, b)


def test_ner_entities_carry_character_offsets(assets, tmp_path):
    _, run = make_run(assets, tmp_path, "bert", data="conll", label="ner", max_epochs=1)
    _, seq = make_run(assets, tmp_path, "bert", extract=dict(views="pooled"), label="sentiment")
    p = Predictor([run, seq], device="cpu")
    assert p.names == [run.name, seq.name] and [h["task"] for h in p.heads_info()] == ["token", "sequence"]
    assert set(p.heads_info()[0]) >= {"name", "task", "labels", "layers", "weights", "metrics"}
    # A raw string, whatever the trained head predicts: force the logits and check the exact entities.
    # "johns" and "londons" are two sub-tokens each (john ##s, london ##s); "in" is [UNK].
    text = "the johns sat on the mat in londons"
    enc = p.encode([text])
    pred = p.forward(enc, heads=[run.name])
    assert list(pred.logits) == [run.name]
    names, wid = p.feeds[run.name].run.label_names, enc.word_ids[0]
    assert [int((wid == w).sum()) for w in (1, 7)] == [2, 2]
    other = next(n for n in names if n not in ("O", "B-per", "B-loc"))
    z = np.zeros((len(wid), len(names)), np.float32)
    for t, w in enumerate(wid.tolist()):
        first = w >= 0 and (t == 0 or wid[t - 1] != w)
        z[t, names.index({1: "B-per", 7: "B-loc"}.get(w, "O") if first else other)] = 1  # later sub-tokens don't count
    pred.logits[run.name][0] = z
    assert p.decode(enc, pred).heads[run.name][0]["entities"] == [
        {"type": "per", "start": 4, "end": 9, "text": "johns"},
        {"type": "loc", "start": 28, "end": 35, "text": "londons"}]
    from adl.serve.decode import entities, joined_spans

    words = ["john", "met", "mary", "smith", "in", "paris"]
    joined, spans = joined_spans(words)
    names = ["O", "B-per", "I-per", "B-loc"]
    tags = [1, 0, 1, 2, 0, 3]
    logits = np.eye(4)[[0, *tags, 0]]  # [CLS] words [SEP]
    word_ids = np.array([-1, 0, 1, 2, 3, 4, 5, -1])
    assert entities(logits, word_ids, spans, joined, names) == [
        {"type": "per", "start": 0, "end": 4, "text": "john"},
        {"type": "per", "start": 9, "end": 19, "text": "mary smith"},
        {"type": "loc", "start": 23, "end": 28, "text": "paris"}]


def test_raw_text_ner_on_byte_level_bpe_gives_the_cache_paths_logits(assets, tmp_path):
    """A RoBERTa NER head on raw text (its split's words joined by spaces) reads what it was trained
    on: the words tokenised with a prefix space each, not the text as one string. Alone, and beside a
    sequence head (then the two kinds of head need two passes, as their tokens differ)."""
    cache, run = make_run(assets, tmp_path, "roberta", "conll", label="ner")
    _, seq = make_run(assets, tmp_path, "roberta", "csv", extract=dict(views="pooled"), label="sentiment")
    ref = cache_logits(cache, run)
    alone, both = Predictor([run], device="cpu"), Predictor([run, seq], device="cpu")
    split = reload_dataset(alone.manifest["dataset"]["spec"]).splits["test"]
    texts = [" ".join(words) for words in split.words]
    for p in (alone, both):
        enc = p.encode(texts)
        assert (enc.token_ts is not None) == (p is both)  # the sequence tokenizer splits these texts otherwise
        pred = p.forward(enc)
        for i, z in zip(split.ids.tolist(), pred.logits[run.name]):
            np.testing.assert_allclose(z, ref[i], **TOL)
    # adl predict on a file of those texts: the entities the cache path's logits give
    from adl.serve.decode import entities
    from adl.serve.predict_cmd import PredictConfig, run_predict

    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    run_predict(PredictConfig(runs=[str(run)], file=str(tmp_path / "texts.txt"), out=str(tmp_path / "t.jsonl")))
    rows = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    enc, labels = alone.encode(texts), alone.runs[0].label_names
    assert [r["ner"]["entities"] for r in rows] == [
        entities(ref[i], enc.word_ids[k], enc.spans[k], texts[k], labels) for k, i in enumerate(split.ids.tolist())]


def test_user_mistakes_are_one_line_errors(assets, tmp_path):
    _, bert = make_run(assets, tmp_path / "a", "bert", extract=dict(views="pooled"))
    _, gpt = make_run(assets, tmp_path / "b", "gpt2", extract=dict(views="pooled"))
    with pytest.raises(AdlError, match="differ in model id"):
        Predictor([bert, gpt], device="cpu")
    p = Predictor([bert], device="cpu")
    with pytest.raises(AdlError, match="input 1 is empty"):
        p(["good", "  "])
    with pytest.raises(AdlError, match="list of texts"):
        p("good")
    with pytest.raises(AdlError, match="no head named"):
        p(["good"], heads=["nope"])
    broken = tmp_path / "broken"
    shutil.copytree(bert, broken)
    (broken / "cache_manifest.json").unlink()
    with pytest.raises(AdlError, match="incomplete .*cache_manifest.json"):
        Predictor([broken])
    info = json.loads((bert / "head.json").read_text())
    (broken / "cache_manifest.json").write_text((bert / "cache_manifest.json").read_text())
    (broken / "head.json").write_text(json.dumps({**info, "adl_version": "99.0"}))
    with pytest.raises(AdlError, match=r"newer adl .*`pip install -U adalayers`"):
        Predictor([broken])
