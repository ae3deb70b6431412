"""adl.attach on tiny models of every family: the user's outputs unchanged bit for bit, the heads'
logits equal to Predictor's on the same tokenisation, one row per prompt whatever the beams, no
hook left after detach (even after an exception), tokenisation differences warned once and
recorded, threads kept apart, heads outside the caller's autocast, and one clear error per misuse."""

import threading
import warnings

import numpy as np
import pytest
import torch
from test_predict import assets, make_run  # noqa: F401 - the module's fixture and run builder
from tiny_backbones import bert_folder

import adl
from adl.errors import AdlError
from adl.extract.pooling import pool
from adl.serve import Predictor
from adl.train.rundir import load_run

TEXTS = ["good movie", "the cat sat on the mat very not good", "bad plot", "john was in paris on monday"]
TOL = dict(rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):  # noqa: F811
    tmp = tmp_path_factory.mktemp("runs")
    return {"bert": make_run(assets, tmp, "bert", extract=dict(views="pooled,tokens"))[1],
            "bert-pooled": make_run(assets, tmp, "bert", extract=dict(views="pooled"), label="bert-pooled")[1],
            "bert-ner": make_run(assets, tmp, "bert", data="conll", label="bert-ner", max_epochs=1)[1],
            "roberta": make_run(assets, tmp, "roberta", extract=dict(views="tokens"))[1],
            "bart": make_run(assets, tmp, "bart", extract=dict(views="pooled,tokens"))[1],
            "gpt2": make_run(assets, tmp, "gpt2", extract=dict(views="pooled"))[1]}  # pool "last"


def tokenizer(folder, left=False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "left" if left else "right"
    return tok


def snapshot(model) -> list:
    """Every module's own attributes (hook tables included) and every tensor: what attaching may touch."""
    out = []
    for m in model.modules():
        out.append({k: (sorted(v) if isinstance(v, dict) else id(v)) for k, v in vars(m).items()})
    return out + [v.clone() for v in model.state_dict().values()]


def same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(a, b))


FAMILIES = [  # run, model class, call
    ("bert", "AutoModelForSequenceClassification", "forward"),
    ("roberta", "AutoModel", "forward"),
    ("bart", "AutoModelForSeq2SeqLM", "generate"),
    ("gpt2", "AutoModelForCausalLM", "generate"),
]


def call(model, batch, how):
    with torch.no_grad():
        if how == "forward":
            out = model(**batch)
            return out.logits if hasattr(out, "logits") else out.last_hidden_state
        return model.generate(**batch, max_new_tokens=4, num_beams=2, do_sample=False)


@pytest.mark.parametrize("name, cls, how", FAMILIES)
def test_outputs_unchanged_and_logits_equal_predictors(assets, runs, name, cls, how):  # noqa: F811
    import transformers

    run = runs[name]
    model = getattr(transformers, cls).from_pretrained(assets[name]).eval()
    batch = tokenizer(assets[name], left=name == "gpt2")(TEXTS, padding=True, return_tensors="pt")
    before = snapshot(model)
    bare = call(model, batch, how)
    with adl.attach(model, [run]) as heads:
        got = call(model, batch, how)
        pred = heads.results()
        assert heads.results().heads[run.name] == []  # results() clears
    assert torch.equal(bare, got)
    assert same(snapshot(model), before)
    ref = Predictor([run], device="cpu")(TEXTS)
    assert len(pred.logits[run.name]) == len(TEXTS)  # one row per prompt, whatever the beams
    for a, b in zip(pred.logits[run.name], ref.logits[run.name]):
        np.testing.assert_allclose(a, b, **TOL)
    assert [h["label"] for h in pred.heads[run.name]] == [h["label"] for h in ref.heads[run.name]]
    assert pred.tokenisation == [[]] * len(TEXTS)  # generate's left padding reads as right padding


def test_detach_leaves_nothing_even_after_an_exception(assets, runs):  # noqa: F811
    from transformers import AutoModel

    model = AutoModel.from_pretrained(assets["bert"]).eval()
    batch = tokenizer(assets["bert"])(TEXTS, padding=True, return_tensors="pt")
    before = snapshot(model)
    with pytest.raises(ZeroDivisionError):
        with adl.attach(model, [runs["bert"]]):
            model(**batch)
            1 / 0
    assert same(snapshot(model), before)
    heads = adl.attach(model, [runs["bert"]])  # attachable again: nothing left behind
    heads.detach()
    model(**batch)
    assert heads.results().heads[runs["bert"].name] == []  # no hook fed it after detach
    assert same(snapshot(model), before)


def test_token_heads_tag_input_ids_or_give_entities_where_texts_are_known(assets, runs):  # noqa: F811
    from transformers import AutoModel, pipeline

    run = runs["bert-ner"]
    tok = tokenizer(assets["bert"])
    model = AutoModel.from_pretrained(assets["bert"]).eval()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    with adl.attach(model, [run]) as heads:
        model(**batch)
        tags = heads.results().heads[run.name]
    width = batch["input_ids"].shape[1]
    for row, mask in zip(tags, batch["attention_mask"]):
        assert len(row["tags"]) == width
        assert [t is not None for t in row["tags"]] == mask.bool().tolist()
        assert set(row["tags"]) - {None} <= set(load_run(run).label_names)
    pipe = pipeline("feature-extraction", model=model, tokenizer=tok)
    with adl.attach(pipe, [run]) as heads:
        pipe(TEXTS)
        pred = heads.results()
    ref = Predictor([run], device="cpu")(TEXTS)
    assert pred.texts == TEXTS
    assert pred.heads[run.name] == ref.heads[run.name]  # the same entities, same character offsets
    for text, row in zip(TEXTS, pred.heads[run.name]):
        for e in row["entities"]:
            assert e["text"] == text[e["start"]:e["end"]]


def test_pipelines_text_classification_and_generation(assets, runs):  # noqa: F811
    """transformers 5 removed the summarization pipeline; text-generation is its generating one."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline

    for name, cls, task in (("bert-pooled", AutoModelForSequenceClassification, "text-classification"),
                            ("gpt2", AutoModelForCausalLM, "text-generation")):
        folder = assets[name.split("-")[0]]
        pipe = pipeline(task, model=cls.from_pretrained(folder).eval(), tokenizer=tokenizer(folder))
        kw = dict(max_new_tokens=4, do_sample=False) if task == "text-generation" else {}
        bare = pipe(TEXTS, **kw)
        with adl.attach(pipe, [runs[name]]) as heads:
            got = pipe(TEXTS, **kw)
            pred = heads.results()
        assert got == bare and pred.texts == TEXTS
        ref = Predictor([runs[name]], device="cpu")(TEXTS)
        for a, b in zip(pred.logits[runs[name].name], ref.logits[runs[name].name]):
            np.testing.assert_allclose(a, b, **TOL)


def test_tokenisation_differences_warn_once_and_are_recorded(assets, runs):  # noqa: F811
    from transformers import AutoModel

    model = AutoModel.from_pretrained(assets["bert"]).eval()
    left = tokenizer(assets["bert"], left=True)(TEXTS, padding=True, return_tensors="pt")
    bare = tokenizer(assets["bert"])(TEXTS, padding=True, add_special_tokens=False, return_tensors="pt")
    with adl.attach(model, [runs["bert"]]) as heads:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model(**left)
            model(**left)
            model(**bare)
        pred = heads.results()
    said = [str(w.message) for w in caught if "adl.attach" in str(w.message)]
    assert len(said) == 2 and "left padding" in said[0] and "special tokens" in said[1]
    lengths = left["attention_mask"].sum(1)
    short, long = int(lengths.argmin()), int(lengths.argmax())  # the longest row has no padding
    assert any("left padding" in n for n in pred.tokenisation[short]) and pred.tokenisation[long] == []
    assert all(any("special tokens" in n for n in row) for row in pred.tokenisation[8:])


def test_threads_each_get_their_own_rows(assets, runs):  # noqa: F811
    from transformers import AutoModel

    model = AutoModel.from_pretrained(assets["bert"]).eval()
    tok = tokenizer(assets["bert"])
    ref = Predictor([runs["bert"]], device="cpu")
    groups = [TEXTS[:2], TEXTS[2:]]
    got, start = {}, threading.Barrier(2)

    def work(k):
        batch = tok(groups[k], padding=True, return_tensors="pt")
        start.wait()
        with torch.no_grad():
            for _ in range(20):
                model(**batch)
        got[k] = heads.results().logits[runs["bert"].name]

    with adl.attach(model, [runs["bert"]]) as heads:
        threads = [threading.Thread(target=work, args=(k,)) for k in (0, 1)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for k, texts in enumerate(groups):
        want = ref(texts).logits[runs["bert"].name]
        assert len(got[k]) == 20 * len(texts)
        for i, z in enumerate(got[k]):
            np.testing.assert_allclose(z, want[i % len(texts)], **TOL)


def test_heads_run_outside_the_callers_autocast(assets, runs):  # noqa: F811
    from transformers import AutoModel

    run = load_run(runs["bert-pooled"])  # adalayers-pooled on pooled:mean, float16 cache
    model = AutoModel.from_pretrained(assets["bert"]).eval()
    batch = tokenizer(assets["bert"])(TEXTS, padding=True, return_tensors="pt")
    with adl.attach(model, [runs["bert-pooled"]]) as heads, torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states = model(**batch, output_hidden_states=True).hidden_states
        got = np.stack(heads.results().logits[run.name])
    mask = batch["attention_mask"]
    with torch.no_grad():  # what extraction stores from the same bf16 pass, and the head on it (training's path)
        z = torch.stack([pool("mean", states[i], mask).half().float() for i in run.layers], 1)
        want = run.head(z, None).numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            inside = run.head(z, None).float().numpy()
    np.testing.assert_allclose(got, want, **TOL)
    assert np.abs(inside - want).max() > 1e-3  # heads inside autocast would not match


def test_misuse_is_one_clear_error(assets, runs, tmp_path):  # noqa: F811
    from transformers import AutoModel, AutoModelForCausalLM

    bert = AutoModel.from_pretrained(assets["bert"]).eval()
    with pytest.raises(AdlError, match="needs a transformers model"):
        adl.attach(object(), [runs["bert"]])
    with pytest.raises(AdlError, match="needs run folders"):
        adl.attach(bert, [])
    deeper = AutoModel.from_pretrained(bert_folder(tmp_path / "deeper", num_hidden_layers=3))
    with pytest.raises(AdlError, match="number of hidden states differs"):
        adl.attach(deeper, [runs["bert"]])
    wider = AutoModel.from_pretrained(bert_folder(tmp_path / "wider", intermediate_size=40))
    with pytest.raises(AdlError, match="config hash differs"):
        adl.attach(wider, [runs["bert"]])
    with pytest.raises(AdlError, match="differ in model id"):
        adl.attach(bert, [runs["bert"], runs["gpt2"]])
    with adl.attach(bert, [runs["bert"]]):
        with pytest.raises(AdlError, match="already attached"):
            adl.attach(bert, [runs["bert-pooled"]])
        batch = tokenizer(assets["bert"])(TEXTS, padding=True, return_tensors="pt")
        with pytest.raises(AdlError, match="inputs_embeds only"):
            bert(inputs_embeds=bert.get_input_embeddings()(batch["input_ids"]))
    gpt = AutoModelForCausalLM.from_pretrained(assets["gpt2"]).eval()
    prompts = tokenizer(assets["gpt2"], left=True)(TEXTS, padding=True, return_tensors="pt")
    with adl.attach(gpt, [runs["gpt2"]]):
        with pytest.raises(AdlError, match="no attention mask"):
            gpt.generate(input_ids=prompts["input_ids"], max_new_tokens=2, do_sample=False)


def test_raw_text_ner_on_byte_level_bpe_reads_the_words_predict_reads(assets, tmp_path):  # noqa: F811
    """A RoBERTa NER head on raw texts (its test split's words joined by spaces) through a pipeline.
    With the tokenizer loaded as extraction loads a token task's (a prefix space per word), the
    user's tokens are extraction's: the heads give the cache path's logits and adl predict's
    entities. With the default tokenizer the first word's tokens differ: every row says so (one
    warning), and entities are still spans of the text's whitespace-separated words, as adl
    predict's are (punctuation glued to a word stays in it)."""
    from test_predict import TOL as CACHE_TOL
    from test_predict import cache_logits
    from transformers import AutoModel, AutoTokenizer, pipeline

    from adl.extract.datasets import reload_dataset
    from adl.serve.attach import OTHER_WORD_TOKENS
    from adl.serve.decode import entities, first_subtokens
    from adl.serve.words import offset_word_ids, split_words

    cache, run = make_run(assets, tmp_path, "roberta", "conll", label="ner")
    ref, labels = cache_logits(cache, run), load_run(run).label_names
    split = reload_dataset(load_run(run).manifest["dataset"]["spec"]).splits["test"]
    texts = [" ".join(words) for words in split.words]
    model = AutoModel.from_pretrained(assets["roberta"]).eval()
    words_tok = AutoTokenizer.from_pretrained(assets["roberta"], add_prefix_space=True)
    pipe = pipeline("feature-extraction", model=model, tokenizer=words_tok)
    with adl.attach(pipe, [run]) as heads:
        pipe(texts)
        pred = heads.results()
    assert pred.tokenisation == [[]] * len(texts)
    enc = Predictor([run], device="cpu").encode(texts)  # how adl predict and adl serve read these texts
    for k, (i, z) in enumerate(zip(split.ids.tolist(), pred.logits[run.name])):
        np.testing.assert_allclose(z, ref[i], **CACHE_TOL)
        assert pred.heads[run.name][k]["entities"] == entities(ref[i], enc.word_ids[k], enc.spans[k], texts[k], labels)

    plain = pipeline("feature-extraction", model=model, tokenizer=AutoTokenizer.from_pretrained(assets["roberta"]))
    with adl.attach(plain, [run]) as heads:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plain(texts)
            pred = heads.results()
    assert sum(OTHER_WORD_TOKENS in str(w.message) for w in caught) == 1
    assert all(row == [OTHER_WORD_TOKENS] for row in pred.tokenisation)
    for text, row in zip(texts, pred.heads[run.name]):
        spans = split_words(text)[1].values()
        for e in row["entities"]:
            assert e["start"] in {a for a, _ in spans} and e["end"] in {b for _, b in spans}
            assert e["text"] == text[e["start"]:e["end"]]
    text = "john met mary, in paris."
    got = plain.tokenizer(text, return_offsets_mapping=True, return_special_tokens_mask=True)
    word_ids = offset_word_ids(got["offset_mapping"], got["special_tokens_mask"], split_words(text)[1])
    assert len(first_subtokens(word_ids)) == 5  # "mary," and "paris." are one word each, as adl predict reads them
    assert [int(w) for w, t in zip(word_ids, got["input_ids"]) if plain.tokenizer.decode([t]) == ","] == [2]
